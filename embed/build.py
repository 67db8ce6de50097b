"""Index a dataset: embed its images into shards, then build the FAISS index and tune the voting.

    python -m embed.build                                   # the bundled sample, the bundled model
    python -m embed.build --data data/osv5m --model vit-l-14-datacomp --splits train test
    torchrun --nproc-per-node 8 -m embed.build --data data/osv5m --model vit-l-14-datacomp

Output (default `<data>/geovote/<model>/`, see geovote.layout):
    embeddings/<split>/shard-NNNNN.parquet   id, latitude, longitude, embedding (fp16, L2-normalised)
    embeddings/<split>/manifest.json          backbone, preprocessing, dim, rows, dataset, config, version
    embeddings/<split>/failures.csv           images that could not be embedded, with the reason
    index/                                    the FAISS index over the train split (index.build)
    index/retrieve.json                       the voting parameters tuned on val (retrieve.tuning)

Resumable: shard NNNNN holds rows [NNNNN * shard_rows, ...) of the split's valid rows and is written
atomically, so a rerun embeds only the shards that are missing. Under torchrun rank r embeds the shards
s with s % world == r, and rank 0 writes the manifest, the index and the tuning once all are there.
"""
from __future__ import annotations

import argparse
import sys

from embed.models import BackboneError
from geovote.config import ConfigError, add_config_args, load_config, overrides_from_args
from geovote.data import DataError
from geovote.photos import PhotoError
from geovote.shards import ShardError
from index.search import IndexError_
from retrieve.pipeline import BuildConfig, build_engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embed.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset root in OSV-5M layout (default: the bundled sample)")
    ap.add_argument("--splits", nargs="+", help="splits to embed (default: train)")
    ap.add_argument("--photos", help="instead of --data: a folder of geotagged photos (EXIF GPS)")
    ap.add_argument("--photos-csv", help="with --photos: path,latitude,longitude for photos lacking EXIF GPS")
    ap.add_argument("--model", help="backbone name, weights or folder (default: the bundled model); "
                                    "`--model list` shows every form")
    ap.add_argument("--out", help="output folder (default: <data>/geovote/<model>)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int)
    add_config_args(ap)
    args = ap.parse_args(argv)
    if args.model == "list":
        from embed.models import describe_models

        print(describe_models())
        return 0
    if args.photos and args.data:
        ap.error("--photos and --data: give one (a folder of photos, or a dataset in OSV-5M layout)")
    if args.photos_csv and not args.photos:
        ap.error("--photos-csv goes with --photos")
    overrides = overrides_from_args(args, ("data", "model", "out", "batch_size", "workers", "splits",
                                           "photos", "photos_csv"))
    try:
        cfg = load_config(BuildConfig, args.config, overrides)
        out = build_engine(cfg)
    except (ConfigError, DataError, BackboneError, ShardError, IndexError_, PhotoError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled up, a folder made read-only meanwhile
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
