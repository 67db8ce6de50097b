"""Score every method on a test split with OSV-5M's metrics, on the same embeddings.

    python -m benchmark.run                                   # the bundled sample (after embed.build)
    python -m benchmark.run --data data/osv5m --engine data/osv5m/geovote/vit-l-14-datacomp
    python -m benchmark.run --methods geovote 1-nn hybrid

Methods: the registry benchmark.methods (listed below in --help).

Writes a run folder: results.json (`methods`: a list of {name, the keys of benchmark.score --json, 95%
bootstrap intervals}), results.csv, results.md, predictions/<method>.parquet (readable by
benchmark.score), accuracy_vs_distance.png and error_map.png.
"""
from __future__ import annotations

import argparse
import sys

from benchmark.evaluate import RunConfig, run
from embed.models import BackboneError
from geovote.config import ConfigError, add_config_args, load_config, overrides_from_args
from geovote.data import DataError
from geovote.layout import EngineMissing
from geovote.shards import ShardError
from index.search import IndexError_


def main(argv: list[str] | None = None) -> int:
    import benchmark.methods

    methods = benchmark.methods.__doc__.split("Methods:", 1)[1]
    ap = argparse.ArgumentParser(prog="python -m benchmark.run", description=f"{__doc__}\nMethods:{methods}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--engine", help="folder written by embed.build (embeddings/ and index/)")
    ap.add_argument("--split", help="split(s) to score, e.g. test,test_far (default: test, and test_far "
                                    "where the dataset has one; each in its own sub-folder when several)")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--out")
    add_config_args(ap)
    args = ap.parse_args(argv)
    overrides = overrides_from_args(args, ("data", "engine", "split", "out", "methods"))
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        out, _ = run(cfg)
    except (ConfigError, DataError, BackboneError, ShardError, IndexError_, EngineMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
