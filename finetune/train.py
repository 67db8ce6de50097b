"""Fine-tune an open_clip image tower for geolocation (or train a small one from scratch).

    python -m finetune.train --config configs/default_model.toml          # the bundled default model
    python -m finetune.train --set base=vit-l-14-datacomp --set train=last:1 --set data=data/osv5m

Objectives (hybrid head, region and retrieval contrastive losses), validation, checkpoints and resuming
are described in finetune.trainer, which does the work. The best epoch is kept as a checkpoint folder
(`<out>/best`) that `embed.build --model` loads; an interrupted run resumes from `<out>/last.pt`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embed.models import BackboneError
from finetune.trainer import TrainConfig, train
from geovote.config import ConfigError, add_config_args, load_config
from geovote.data import DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        state = train(cfg)
    except (ConfigError, DataError, BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state["rank"] == 0 and not state["history"]:
        print(f"no epoch to train (epochs={cfg.epochs}, already done, or max_steps reached): nothing written")
    elif state["rank"] == 0:
        print(f"best validation GeoScore {state['best']:.0f}; checkpoint: {Path(cfg.out) / 'best'}")
    else:
        print(f"rank {state['rank']}: done after epoch {state['epoch']} (step {state['step']})")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
