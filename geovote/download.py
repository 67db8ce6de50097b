"""Download OSV-5M from the Hugging Face hub, whole or in part, and verify it.

    python -m geovote.download --out data/osv5m                      # everything (~200 GB)
    python -m geovote.download --out data/osv5m --split test         # the test split only
    python -m geovote.download --out data/osv5m --train-archives 2   # test + the first 2 train archives
    python -m geovote.download --out data/osv5m --no-download        # verify what is there
    python -m geovote.download --out data/osv5m --extract            # unzip too, as OSV-5M's own script

Downloads are resumable (the hub client skips complete files and resumes partial ones). The archives
stay as they are by default: embed.build reads their members in place (geovote.archives), as fast as
from extracted files (`python -m benchmark.embed_bench`: 1.11x the files' rate, identical embeddings),
without 5.1M small files or a second copy while extracting, and the images are counted in them. With
--extract each archive `images/<split>/NN.zip` is unzipped in place, like OSV-5M's own script; a marker
`NN.zip.done` records a finished extraction, so a rerun skips it, and the archive is then deleted
(unless --keep-archives) and not downloaded again. Finally the images found are counted against the
split's CSV.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from geovote.data import DataError, index_images, iter_csv_batches, split_csv
from geovote.hub import OfflineError, check_online, hub_endpoint
from geovote.paths import data_root

REPO_ID = "osv5m/osv5m"
DONE_SUFFIX = ".done"


def select_files(repo_files: list[str], splits: tuple[str, ...], train_archives: int | None) -> list[str]:
    """The repo files to fetch: each split's CSV and its image archives (train: the first N if asked)."""
    chosen = []
    for split in splits:
        if f"{split}.csv" in repo_files:
            chosen.append(f"{split}.csv")
        zips = sorted(f for f in repo_files
                      if f.startswith(f"images/{split}/") and f.endswith(".zip"))
        if split == "train" and train_archives is not None:
            zips = zips[:train_archives]
        chosen += zips
    return chosen


def download(out: Path, splits: tuple[str, ...], train_archives: int | None, workers: int = 8) -> list[str]:
    """Fetch the chosen files into `out`, skipping archives already extracted. Returns what was asked."""
    check_online()
    from huggingface_hub import HfApi, snapshot_download

    repo_files = HfApi(endpoint=hub_endpoint()).list_repo_files(REPO_ID, repo_type="dataset")
    wanted = select_files(repo_files, splits, train_archives)
    todo = [f for f in wanted if not (out / (f + DONE_SUFFIX)).exists()]
    if todo:
        snapshot_download(repo_id=REPO_ID, repo_type="dataset", local_dir=out, allow_patterns=todo,
                          max_workers=workers)
    return wanted


def _safe_members(zf: zipfile.ZipFile, dest: Path) -> list[zipfile.ZipInfo]:
    """Refuse archives that would write outside `dest` (absolute paths, '..')."""
    members = zf.infolist()
    for m in members:
        p = PurePosixPath(m.filename)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{zf.filename}: member {m.filename!r} would be written outside {dest}")
    return members


def extract_archives(root: Path, split: str, keep_archives: bool = False) -> tuple[int, int]:
    """Unzip every `images/<split>/*.zip` in place. Returns (archives extracted now, already done)."""
    folder = root / "images" / split
    done_now = skipped = 0
    for zpath in sorted(folder.glob("*.zip")) if folder.is_dir() else []:
        marker = zpath.with_name(zpath.name + DONE_SUFFIX)
        if marker.exists():
            skipped += 1
        else:
            try:
                with zipfile.ZipFile(zpath) as zf:
                    zf.extractall(folder, members=_safe_members(zf, folder))
            except zipfile.BadZipFile as e:
                raise DataError(f"{zpath} is not a complete zip archive ({e}); delete it and rerun "
                                "to download it again") from None
            marker.write_text("extracted\n")  # written only once every member is on disk
            done_now += 1
        if not keep_archives:
            zpath.unlink()
    return done_now, skipped


@dataclass
class Verification:
    split: str
    csv_rows: int
    images: int
    missing: int  # CSV ids with no image
    extra: int  # images with no CSV row
    broken: list[str] = field(default_factory=list)  # archives that cannot be listed (incomplete), why

    def summary(self) -> str:
        line = (f"{self.split}: {self.csv_rows:,} rows in {self.split}.csv, {self.images:,} images; "
                f"{self.missing:,} rows without an image, {self.extra:,} images without a row")
        return line + ("" if self.missing or self.extra or self.broken else " (complete)")


def verify(root: Path, split: str) -> Verification:
    """Count images on disk against the CSV's ids (streamed: bounded memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    broken: list[str] = []
    images = index_images(root, split, log=broken.append).column("id")
    csv_path = split_csv(root, split)
    rows = missing = 0
    found_ids = []
    for batch in iter_csv_batches(csv_path, ["id"]):
        ids = batch.column("id")
        rows += len(ids)
        have = pc.is_in(ids, value_set=images)
        missing += len(ids) - pc.sum(have).as_py() if len(ids) else 0
        found_ids.append(ids.filter(have))
    matched = pa.chunked_array(found_ids, pa.string()).unique() if found_ids else pa.array([], pa.string())
    return Verification(split, rows, len(images), missing, len(images) - len(matched), broken)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geovote.download", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="data folder (default: data/osv5m)")
    ap.add_argument("--split", choices=["all", "train", "test"], default="all")
    ap.add_argument("--train-archives", type=int, default=None, metavar="N",
                    help="fetch only the first N train image archives (the full set is ~200 GB)")
    ap.add_argument("--no-download", action="store_true", help="only verify (and with --extract unzip) "
                                                                   "what is there")
    ap.add_argument("--extract", action="store_true",
                    help="unzip the archives (by default they stay: embed.build reads them in place, with "
                         "no 5.1M small files and no second copy while extracting)")
    ap.add_argument("--keep-archives", action="store_true", help="with --extract: keep the zips afterwards")
    ap.add_argument("--no-extract", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args(argv)
    if args.train_archives is not None and args.train_archives < 1:
        ap.error("--train-archives must be at least 1")
    if args.extract and args.no_extract:
        ap.error("--extract and --no-extract: give one (keeping the archives is the default)")
    if args.keep_archives and not args.extract:
        ap.error("--keep-archives goes with --extract (without it the archives are kept anyway)")
    out = args.out or data_root() / "osv5m"
    splits = ("train", "test") if args.split == "all" else (args.split,)
    try:
        if not args.no_download:
            out.mkdir(parents=True, exist_ok=True)
            wanted = download(out, splits, args.train_archives, args.workers)
            print(f"downloaded {len(wanted)} files of {REPO_ID} into {out}", file=sys.stderr)
        for split in splits:
            if args.extract:
                now, before = extract_archives(out, split, args.keep_archives)
                print(f"{split}: extracted {now} archives ({before} done before)", file=sys.stderr)
            v = verify(out, split)  # files and archive members alike (index_images)
            print(v.summary())
            if v.broken:
                raise DataError("; ".join(v.broken) + ": not a complete archive; delete it and rerun to "
                                "download it again")
    except OfflineError as e:
        print(f"error: {e}. Downloading OSV-5M needs the hub; offline, use the bundled sample "
              "(python -m geovote.sample), or copy a download made elsewhere into --out and run this again "
              "with --no-download to verify it", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
