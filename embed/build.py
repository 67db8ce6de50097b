"""Index a dataset: embeddings, then the FAISS index.

    python -m embed.build                      # the bundled sample (generated on first use)
    python -m embed.build --data ROOT --split train

For now this prepares and validates the dataset and stops there: the embedding stage (issue #3) and
the index (issue #4) are not built yet, and it says so rather than pretend.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geovote.data import DataError, read_split
from geovote.sample import ensure_sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embed.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None,
                    help="dataset root in OSV-5M layout (default: the bundled sample)")
    ap.add_argument("--split", default="train")
    args = ap.parse_args(argv)
    try:
        root = args.data if args.data is not None else ensure_sample()
        split = read_split(root, args.split)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(split.report.summary())
    print(f"embed.build: {len(split):,} images of {root}/{args.split} are ready to embed; "
          "stopping here: the embedding stage is not built yet (issue #3).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
