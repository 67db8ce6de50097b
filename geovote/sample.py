"""Generate the bundled sample (geovote.bundled_sample): real imagery in OSV-5M's layout, offline.

    python -m geovote.sample --out data/sample                  # 20,000 train, 2,000 val, 2,000 test
    python -m geovote.sample --config configs/sample.toml --set n_train=5000
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from geovote.bundled_sample import SampleConfig, generate
from geovote.config import ConfigError, add_config_args, load_config
from geovote.paths import default_sample_root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geovote.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder (default: data/sample)")
    add_config_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(SampleConfig, args.config, args.overrides)
        for name in ("n_train", "n_val", "n_test"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        for name in ("n_test_far", "n_val_far"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"{name} must be 0 (no {name[2:]} split) or more, got {getattr(cfg, name)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generate(args.out or default_sample_root(), **asdict(cfg))
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
