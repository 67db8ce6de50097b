"""Share an engine: write exactly what queries need into a folder, with a manifest of sizes and sha256
hashes and a model card, and upload it to the Hugging Face hub.

    python -m retrieve.publish data/sample/geovote/default --to published/sample-engine
    python -m retrieve.publish ENGINE --to DIR --repo ORG/NAME [--private]      # then upload it
    python -m retrieve.query photo.jpg --index hf-hub:ORG/NAME                  # anyone, anywhere

The folder holds the index (the FAISS files with the fp16 re-rank copy, ids and coordinates), the tuned
voting and calibrations, the derived tables, the model's weights when they are a folder (a finetune
checkpoint), engine.json and README.md; no embedding shards, and no path of this machine. The upload
needs `huggingface-cli login` (or HF_TOKEN). Answering from hf-hub:ORG/NAME downloads only what
engine.json lists into the hub cache, checks every file's sha256, and works offline afterwards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geovote.layout import EngineMissing
from retrieve.share import ShareError, publish, upload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieve.publish", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path, help="an engine folder (embed.build's output) or its index folder")
    ap.add_argument("--to", type=Path, required=True, help="the folder to write (must not exist)")
    ap.add_argument("--repo", help="then upload the folder to this hub repo (ORG/NAME)")
    ap.add_argument("--private", action="store_true", help="with --repo: a private repo")
    ap.add_argument("--license",
                    help="the gallery's licence for the card (default: from the dataset, else other)")
    ap.add_argument("--results", type=Path, help="a benchmark.run results.json to quote in the card")
    args = ap.parse_args(argv)
    if args.private and not args.repo:
        ap.error("--private applies to the repo --repo creates")
    if args.repo and (args.repo.count("/") != 1 or not all(args.repo.split("/"))):
        ap.error(f"--repo {args.repo!r}: give ORG/NAME")
    try:
        out = publish(args.engine, args.to, license=args.license, results=args.results, repo=args.repo)
        if args.repo:
            upload(out, args.repo, private=args.private)
    except (EngineMissing, ShareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
