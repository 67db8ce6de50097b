"""What sharing an engine costs (retrieve.share), measured side by side in one run.

    python -m benchmark.share_bench [--engine DIR] [--image IMG]

Publishes the engine into a temporary folder, lays that folder out as a Hugging Face hub cache
(blobs, snapshot links, refs/main: what a download leaves), and times, each in a fresh process with
HF_HUB_OFFLINE=1: the first answer from `--index hf-hub:...` with an empty verification record (every
file hashed), the next one (hashes already checked), and the first answer from the local engine. Prints
the published size against the engine folder's and per image.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = "bench/engine"
REVISION = "b" * 40


def as_hub_cache(published: Path, home: Path, repo: str = REPO, revision: str = REVISION) -> Path:
    """`published` laid out as huggingface_hub keeps a downloaded snapshot under `home` (HF_HOME): blobs
    named by their hash, the snapshot's files links to them, refs/main naming the revision. Returns the
    repo's cache folder."""
    from geovote.paths import file_sha256

    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    for f in sorted(p for p in published.rglob("*") if p.is_file()):
        blob = base / "blobs" / file_sha256(f)
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, blob)
        link = base / "snapshots" / revision / f.relative_to(published)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return base


def timed(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retrieve.query", *args, "--json"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.share_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=None, help="engine folder (default: the sample's)")
    ap.add_argument("--image", type=Path, default=None,
                    help="the photo to answer (default: a sample test image)")
    args = ap.parse_args(argv)
    from geovote.layout import EngineLayout
    from geovote.paths import default_sample_root
    from retrieve.share import publish

    engine = args.engine or EngineLayout.for_dataset().root
    image = args.image or sorted((default_sample_root() / "images" / "test").rglob("*.jpg"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        published = publish(engine, tmp / "published", log=print)
        publish_s = time.perf_counter() - t0
        as_hub_cache(published, tmp / "hf")
        env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
               "GEOVOTE_CACHE": str(tmp / "gv")}
        first = timed([str(image), "--index", f"hf-hub:{REPO}"], env)
        again = timed([str(image), "--index", f"hf-hub:{REPO}"], env)
        local = timed([str(image), "--index", str(EngineLayout(engine).index)], env)
    print(f"publish: {publish_s:.1f} s")
    print(f"first answer from the hub cache (every file hashed): {first:.2f} s; the next: {again:.2f} s; "
          f"from the local engine: {local:.2f} s ({first / local:.2f}x and {again / local:.2f}x the local)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
