"""Choose the voting parameters (k, T, cells and levels, bandwidth) on the validation split, never on test,
and store them with the index (retrieve.json).

    python -m retrieve.tune                              # the sample's index and its val split
    python -m retrieve.tune --index DIR --data ROOT --split val

The validation images are embedded once (resumable) beside the index. One search at the largest k serves
every setting; the grid is small enough to be exhaustive. 1-NN and the weighted mean are scored too.
A dataset without val.csv (OSV-5M) is tuned on 2,000 training images held out of their own search (the
image itself, anything within 1 km, its capture sequence). The work is done by retrieve.tuning.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from embed.models import BackboneError
from geovote.config import ConfigError
from geovote.data import DataError
from geovote.layout import EngineMissing, resolve
from geovote.paths import default_sample_root
from index.search import IndexError_
from retrieve.engine import Engine
from retrieve.tuning import TooFewToTune, tune_and_save


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieve.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None, help="index folder (default: the sample's)")
    ap.add_argument("--data", type=Path, default=None, help="dataset root (default: the sample)")
    ap.add_argument("--split", default="val")
    args = ap.parse_args(argv)
    if args.split == "test" or args.split.startswith("test_"):
        print(f"error: tuning on the {args.split} split would make its scores meaningless; use val",
              file=sys.stderr)
        return 2
    try:
        engine = Engine(resolve(index=args.index).require_index(), calibrated=False)
        best, scores, path = tune_and_save(engine, args.data or default_sample_root(), args.split)
    except (EngineMissing, IndexError_, BackboneError, DataError, ConfigError, TooFewToTune, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in scores.items():
        print(f"{name:>14}: GeoScore {s['geoscore']:7.1f}  acc@25km {s['acc_25km']:.3f}  "
              f"median {s['median_km']:,.0f} km")
    print(f"chosen: {json.dumps(asdict(best))} -> {path}")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
