"""The embedding stage as a library: one split of a dataset -> embedding shards, resumable.

    embed_split(split, backbone, out_dir, EmbedConfig(...), root)

Output folder (EngineLayout.embeddings(split)):
    shard-NNNNN.parquet      id, latitude, longitude, embedding (fp16, L2-normalised)
    manifest.json            backbone, preprocessing, dim, rows, dataset, images, config, version (last)
    failures.csv             images that could not be embedded, with the reason
    plan.json                pins backbone, dataset, split, rows and ids, so a resumed run cannot mix them
    fingerprints.npy         uint64 per embedded row (shard order): a hash of its id, coordinates and, for
                             photos, file size and modification time (written just before the manifest)

Resumable: shard NNNNN holds rows [NNNNN * shard_rows, ...) of the split's valid rows and is written
atomically, so a rerun embeds only the shards that are missing. Updatable: when a finished run's split
gained, lost or changed rows (a photo folder or a CSV that grew), a rerun embeds only the rows whose
fingerprint the run lacks, takes the others' vectors from its shards, and replaces the folder by renames
(update_split); a dataset image replaced under the same id and coordinates is not noticed. Under
torchrun rank r embeds the shards s with s % world == r; rank 0 writes the manifest once all are there.
The images are turned into vectors by the one feature extractor (embed.features). `python -m embed.build`
is the command that runs this, then the index and the tuning (retrieve.pipeline).
"""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embed.features import FeatureExtractor, ImageFiles
from embed.images import DEFAULT_MAX_PIXELS
from geovote import csvsafe
from geovote.csvsafe import uncell
from geovote.data import DataError
from geovote.shards import MANIFEST, shard_paths, write_shard

PLAN = "plan.json"
FAILURES = "failures.csv"
FINGERPRINTS = "fingerprints.npy"
UPDATABLE = {"rows", "ids_sha256", "rows_sha256"}  # plan keys a finished run is updated across


@dataclass
class EmbedConfig:
    """How images become vectors; what to embed and what follows (index, tuning) is the main job's
    (retrieve.pipeline.BuildConfig)."""
    model: str = "default"  # see embed.models
    batch_size: int = 256
    workers: int = -1  # DataLoader decoding processes; 0: in the main process; -1: auto (decode_workers)
    shard_rows: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS
    pause_s: float = 0.0  # sleep after each batch: leaves a shared machine to others (tests: stop a run)
    # "pil": workers decode (JPEG draft scaling); "pil-full": the same at full size (the plain decode,
    # exactly); "torchvision": workers read bytes, the batch is decoded on the model's device (nvjpeg on
    # CUDA, embed.gpudecode). Recorded in the plan: a run never mixes them
    decode: str = "pil"

    def __post_init__(self):
        from embed.gpudecode import DECODE_PATHS
        from geovote.config import ConfigError

        if self.decode not in DECODE_PATHS:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {self.decode!r}")

        for name in ("batch_size", "shard_rows", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < -1:
            raise ConfigError(f"workers must be -1 (auto), 0 or more, got {self.workers}")
        if self.pause_s < 0:
            raise ConfigError(f"pause_s must be >= 0, got {self.pause_s}")


def image_dataset(paths, extractor: FeatureExtractor, cfg: EmbedConfig):
    """The images as FeatureExtractor.dataset takes them: decoded in the workers ("pil" at reduced size,
    "pil-full"), or their bytes, decoded as a batch on the extractor's device ("torchvision")."""
    bb = extractor.backbone
    if cfg.decode == "torchvision":
        from embed.gpudecode import EncodedImages

        return EncodedImages(paths, bb.image_size, cfg.max_pixels)
    return ImageFiles(paths, extractor.transform(), bb.image_size, cfg.max_pixels,
                      reduced=cfg.decode == "pil")


def code_version() -> str:
    import geovote

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{geovote.__version__}+{rev}" if rev else geovote.__version__


def decode_workers(requested: int) -> int:
    """-1 (auto): none on a machine of 2 cores or fewer, where worker processes only compete with the
    forward pass for the same cores (sample, 64 px: 1,173 images/s with 0 workers against 1,025 with 1
    and 1,063 with 2, docs/BENCHMARKS.md); else half the cores, at most 8."""
    if requested >= 0:
        return requested
    import os

    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


def shard_batches(shards: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of rows that never straddle a shard: shards as (start, stop) row ranges."""
    return [list(range(b, min(b + batch_size, stop))) for start, stop in shards
            for b in range(start, stop, batch_size)]


def plan_for(split, backbone, cfg: EmbedConfig, root: Path, fingerprints: np.ndarray | None = None) -> dict:
    """What a run embeds. `fingerprints` (row_fingerprints): their digest joins the plan, and so the
    manifest and the index built from it, which an edited row (new coordinates, a photo changed in
    place) then no longer matches."""
    ids_hash = hashlib.sha256("\n".join(split.ids.astype(str)).encode()).hexdigest()[:16]
    plan = {"backbone": backbone.name, "dim": backbone.dim, "dataset": str(root.resolve()),
            "split": split.name, "rows": len(split), "ids_sha256": ids_hash, "shard_rows": cfg.shard_rows}
    if cfg.decode != "pil":  # (absent for the default: plans written before the option still match)
        plan["decode"] = cfg.decode
    if fingerprints is not None:
        plan["rows_sha256"] = hashlib.sha256(np.ascontiguousarray(fingerprints).tobytes()).hexdigest()[:16]
    return plan


def embed_split(split, backbone, out_dir: Path, cfg: EmbedConfig, root: Path, rank: int = 0, world: int = 1,
                log=print) -> dict | None:
    """Embed one split into `out_dir`. Returns the manifest (rank 0), after all ranks finish."""
    from geovote import distributed

    split.require_rows()  # before anything is written: no plan.json for a split with nothing to embed
    if rank == 0:
        _finish_swap(out_dir)
    if world > 1:  # no rank makes the folder while rank 0 may still be putting an update back in place
        distributed.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprints = row_fingerprints(split)
    plan = plan_for(split, backbone, cfg, root, fingerprints)
    plan_path = out_dir / PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan and "rows_sha256" not in old and old == plan_for(split, backbone, cfg, root):
            old = plan  # a run from before fingerprints, of the same rows: taken as current (rank 0 says so)
            if rank == 0:
                plan_path.write_text(json.dumps(plan, indent=2) + "\n")
        if old != plan:
            changed = [k for k in plan if old.get(k) != plan[k]]
            updatable = set(changed) <= UPDATABLE and (out_dir / FINGERPRINTS).is_file()
            if updatable and world == 1:
                return update_split(split, backbone, out_dir, cfg, plan, fingerprints, log)
            why = (" (an update runs in one process: rerun without torchrun)" if updatable else
                   "; it can be updated only once finished, by this version" if set(changed) <= UPDATABLE
                   else "")
            raise DataError(f"{out_dir} holds an earlier run with a different {', '.join(changed)}{why}; "
                            "use another --out or delete it")
    elif rank == 0:
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    n = len(split)
    n_shards = max(1, -(-n // cfg.shard_rows))
    mine = [s for s in range(n_shards) if s % world == rank]
    todo = [s for s in mine if not (out_dir / f"shard-{s:05d}.parquet").exists()]
    if world == 1 and not todo and (out_dir / MANIFEST).exists():  # finished before, and the plan matches
        if not (out_dir / FINGERPRINTS).is_file():  # a run from before fingerprints
            write_fingerprints(out_dir, split, fingerprints)
        write_archived_images(out_dir, split)  # the images may have been extracted (or archived) since
        return json.loads((out_dir / MANIFEST).read_text())
    if len(todo) < len(mine):
        log(f"{split.name}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
    ids, lat, lon = split.ids.astype(str), split.lat_deg, split.lon_deg
    paths = split.image_paths()
    ranges = [(s * cfg.shard_rows, min(n, (s + 1) * cfg.shard_rows)) for s in todo]
    n_todo = sum(b - a for a, b in ranges)
    extractor = FeatureExtractor(backbone, batch_size=cfg.batch_size)
    files = image_dataset(paths, extractor, cfg)
    writer = ThreadPoolExecutor(1)  # parquet writes overlap the next batches' compute
    pending = []
    buf: dict[int, list] = {}
    done_rows = {s: 0 for s in todo}
    t0 = time.perf_counter()
    n_failed = 0
    from tqdm import tqdm

    bar = tqdm(total=n_todo, unit="img", desc=f"embed {split.name}", disable=rank != 0 or n_todo == 0,
               mininterval=1.0, file=sys.stderr)
    for rows, emb, reasons in extractor.dataset(files, shard_batches(ranges, cfg.batch_size),
                                                decode_workers(cfg.workers)):
        ok = np.array([r == "" for r in reasons], bool)
        shard = int(rows[0]) // cfg.shard_rows
        failed = [(ids[r], str(paths[r]), why) for r, why in zip(rows, reasons) if why]
        n_failed += len(failed)
        buf.setdefault(shard, []).append((rows[ok], emb.astype(np.float16), failed))
        done_rows[shard] += len(rows)
        start, stop = shard * cfg.shard_rows, min(n, (shard + 1) * cfg.shard_rows)
        if done_rows[shard] == stop - start:
            pending.append(writer.submit(write_split_shard, out_dir, shard, buf.pop(shard), ids, lat, lon,
                                         backbone.dim))
        bar.update(len(rows))
        if cfg.pause_s:
            time.sleep(cfg.pause_s)
    bar.close()
    for f in pending:
        f.result()  # re-raises a failed write
    writer.shutdown()
    elapsed = time.perf_counter() - t0
    if world > 1:  # callers that embed on rank 0 alone (tuning, predictions) pass world=1: no barrier
        distributed.barrier()
    if rank != 0:
        return None
    return finish_split(out_dir, plan, backbone, cfg, n_shards, n_todo, n_failed, elapsed, log,
                        lambda: _before_manifest(out_dir, split, fingerprints), images=split.images)


def row_fingerprints(split) -> np.ndarray:
    """uint64 per row of the split: a hash of its id, coordinates and, when the split has them (photos),
    file size and modification time. Two runs over a row with equal fingerprints embed the same image."""
    cols = [split.ids.astype(str), split.lat_deg, split.lon_deg]
    cols += [split.column(c) for c in ("size", "mtime_ns") if c in split.table.column_names]
    out = np.empty(len(split), np.uint64)
    for i, row in enumerate(zip(*cols)):
        digest = hashlib.blake2b(repr(tuple(str(v) for v in row)).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def _before_manifest(out_dir: Path, split, fingerprints: np.ndarray) -> None:
    write_fingerprints(out_dir, split, fingerprints)
    write_archived_images(out_dir, split)


def write_archived_images(out_dir: Path, split) -> None:
    """archived-images.parquet (geovote.layout): the id and path of every image of the split read from
    an archive (a zip or a webdataset shard), sorted by id, so that the engine can show it as evidence
    later; none (an earlier one removed) when every image is a file, which the engine finds by name."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from geovote.archives import MEMBER_PATTERN
    from geovote.layout import ARCHIVED_IMAGES_FILE

    target = out_dir / ARCHIVED_IMAGES_FILE
    t = split.table.select(["id", "path"]) if "path" in split.table.column_names else None
    if t is not None:
        t = t.filter(pc.match_substring_regex(t.column("path"), MEMBER_PATTERN))
    if t is None or t.num_rows == 0:
        target.unlink(missing_ok=True)
        return
    t = pa.table({"id": t.column("id").cast(pa.string()), "path": t.column("path")})
    t = t.take(pc.sort_indices(t, [("id", "ascending")]))  # text in UTF-8 byte order: the engine bisects
    tmp = target.with_name(target.name + ".partial")
    pq.write_table(t, tmp)
    tmp.replace(target)


def write_fingerprints(out_dir: Path, split, fingerprints: np.ndarray) -> None:
    """fingerprints.npy: the fingerprints of the split's rows that the shards in `out_dir` hold (all but
    its failures), in shard order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with open(out_dir / FAILURES, newline="", encoding="utf-8") as f:
        failed = [uncell(r[0]) for r in list(csv.reader(f))[1:]]
    held = np.asarray(pc.invert(pc.is_in(split.table.column("id"), value_set=pa.array(failed, pa.string()))))
    fp = fingerprints[held]
    tmp = out_dir / (FINGERPRINTS + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, fp)
    tmp.replace(out_dir / FINGERPRINTS)


def _staged(out_dir: Path) -> tuple[Path, Path]:
    """(the folder an update is assembled in, the name the folder it replaces takes meanwhile)"""
    return out_dir.with_name(out_dir.name + ".update"), out_dir.with_name(out_dir.name + ".replaced")


def _finish_swap(out_dir: Path) -> None:
    """Complete or undo an update that stopped between its renames (update_split), so that `out_dir` is
    whole again: the finished new folder wins, else the old one comes back."""
    import shutil

    stage, replaced = _staged(out_dir)
    if not out_dir.exists() and replaced.exists():
        if (stage / MANIFEST).is_file():
            stage.rename(out_dir)
        else:
            replaced.rename(out_dir)
    for leftover in (stage, replaced):
        if leftover.exists():
            shutil.rmtree(leftover)


def update_split(split, backbone, out_dir: Path, cfg: EmbedConfig, plan: dict, fingerprints: np.ndarray,
                 log=print) -> dict:
    """Bring a finished run in `out_dir` up to date with `split`: rows whose fingerprint the run holds
    keep their vectors, the others (added or changed) are embedded, rows no longer in the split are
    dropped. The new folder is assembled beside it and takes its place by two renames (_finish_swap
    completes them after a crash). Returns the new manifest."""
    import shutil

    from geovote.shards import read_embeddings

    t0 = time.perf_counter()
    old_fp = np.load(out_dir / FINGERPRINTS)
    new_fp = fingerprints
    order = np.argsort(old_fp)
    pos = np.minimum(np.searchsorted(old_fp[order], new_fp), max(len(old_fp) - 1, 0))
    reuse = old_fp[order][pos] == new_fp if len(old_fp) else np.zeros(len(new_fp), bool)
    old_rows = order[pos[reuse]]  # the shard row holding each kept row's vector
    todo = np.flatnonzero(~reuse)
    n = len(split)
    log(f"{split.name}: updating {out_dir}: {int(reuse.sum()):,} of {n:,} images unchanged, {len(todo):,} "
        f"to embed (new, changed or failed before), {len(old_fp) - int(reuse.sum()):,} earlier ones dropped "
        "(removed or changed)")
    ids, lat, lon, paths = split.ids.astype(str), split.lat_deg, split.lon_deg, split.image_paths()
    kept_rows = np.unique(old_rows)
    # read before the long embedding, and checked row by row against what the fingerprints promised:
    # a vector is kept only for the image (id and coordinates) it was made from
    kept_shards = read_embeddings(out_dir, rows=kept_rows, dtype=np.float16)
    kept = kept_shards.embedding
    where_kept = np.full(n, -1, np.int64)
    where_kept[np.flatnonzero(reuse)] = np.searchsorted(kept_rows, old_rows)
    mine = np.flatnonzero(reuse)
    same = ((kept_shards.ids.astype(str)[where_kept[mine]] == ids[mine])
            & (kept_shards.lat_deg[where_kept[mine]] == lat[mine])
            & (kept_shards.lon_deg[where_kept[mine]] == lon[mine]))
    if not np.all(same):
        bad = mine[~same][0]
        raise DataError(f"{out_dir}: {FINGERPRINTS} does not match its shards (row of {ids[bad]!r} holds "
                        "another image): the folder was changed by another program; delete it and rebuild")
    emb_new = np.zeros((len(todo), backbone.dim), np.float16)
    why_new = [""] * len(todo)
    if len(todo):
        extractor = FeatureExtractor(backbone, batch_size=cfg.batch_size)
        files = image_dataset(paths, extractor, cfg)
        batches = [todo[i:i + cfg.batch_size].tolist() for i in range(0, len(todo), cfg.batch_size)]
        for rows, emb, reasons in extractor.dataset(files, batches, decode_workers(cfg.workers)):
            at = np.searchsorted(todo, rows)
            ok = np.array([r == "" for r in reasons], bool)
            emb_new[at[ok]] = emb.astype(np.float16)  # vectors of the images that could be read, in order
            for i, why in zip(at, reasons):
                why_new[i] = why
            if cfg.pause_s:
                time.sleep(cfg.pause_s)
    where_new = np.full(n, -1, np.int64)
    where_new[todo] = np.arange(len(todo))
    stage, replaced = _staged(out_dir)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    n_shards = max(1, -(-n // cfg.shard_rows))
    n_failed = 0
    for shard in range(n_shards):
        rows = np.arange(shard * cfg.shard_rows, min(n, (shard + 1) * cfg.shard_rows))
        failed = [(ids[r], str(paths[r]), why_new[where_new[r]]) for r in rows
                  if where_new[r] >= 0 and why_new[where_new[r]]]
        n_failed += len(failed)
        ok = np.array([where_kept[r] >= 0 or not why_new[where_new[r]] for r in rows], bool)
        emb = np.empty((len(rows), backbone.dim), np.float16)
        from_old, from_new = where_kept[rows] >= 0, where_new[rows] >= 0
        emb[from_old] = kept[where_kept[rows][from_old]]
        emb[from_new] = emb_new[where_new[rows][from_new]]
        emb = emb[ok]
        write_split_shard(stage, shard, [(rows[ok], emb, failed)], ids, lat, lon, backbone.dim)
    (stage / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    elapsed = time.perf_counter() - t0
    manifest = finish_split(stage, plan, backbone, cfg, n_shards, len(todo), n_failed, elapsed, log,
                            lambda: _before_manifest(stage, split, fingerprints), out_dir,  # complete
                            images=split.images)
    out_dir.rename(replaced)
    stage.rename(out_dir)
    shutil.rmtree(replaced)
    return manifest


def write_split_shard(out_dir: Path, shard: int, parts: list, ids, lat, lon, dim: int) -> None:
    rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
    emb = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, dim), np.float16)
    failed = [f for p in parts for f in p[2]]
    fail_path = out_dir / f"shard-{shard:05d}.failures.csv"
    tmp = fail_path.with_name(fail_path.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:  # before the shard: a finished shard always
        w = csv.writer(f)                                     # has its failures
        w.writerow(["id", "path", "reason"])
        w.writerows(csvsafe.row(r) for r in failed)
    tmp.replace(fail_path)
    write_shard(out_dir / f"shard-{shard:05d}.parquet", ids[rows], lat[rows], lon[rows], emb)


def finish_split(out_dir: Path, plan: dict, backbone, cfg: EmbedConfig, n_shards: int, n_embedded_now: int,
                  n_failed_now: int, elapsed: float, log, before_manifest=None,
                  listed_in: Path | None = None, images: str = "dataset") -> dict:
    """Gather the failures, check the count and write the manifest, last: a folder with a manifest is a
    finished run. `before_manifest()` writes what must be there when it is (the fingerprints);
    `listed_in`: the folder `out_dir` becomes (an update's), named in the summary; `images`: the split's
    (Split.images), which tells the engine where a gallery image's file is."""
    import pyarrow.parquet as pq

    missing = [s for s in range(n_shards) if not (out_dir / f"shard-{s:05d}.parquet").exists()]
    if missing:
        raise DataError(f"{out_dir}: shards {missing[:5]} missing after the run")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(out_dir))
    failures = []
    for s in range(n_shards):
        with open(out_dir / f"shard-{s:05d}.failures.csv", newline="", encoding="utf-8") as f:
            failures += list(csv.reader(f))[1:]  # cells as written (csvsafe): copied, not read
    with open(out_dir / FAILURES, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "reason"])
        w.writerows(failures)
    if rows + len(failures) != plan["rows"]:
        raise DataError(f"{out_dir}: {rows} embedded + {len(failures)} failed != {plan['rows']} rows")
    if before_manifest is not None:
        before_manifest()
    manifest = {**plan, "rows": rows, "failures": len(failures), "valid_rows": plan["rows"],
                "n_shards": n_shards, "preprocessing": backbone.preprocessing(),
                "images": images, "config": asdict(cfg), "code_version": code_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    rate = n_embedded_now / elapsed if elapsed > 0 else 0.0
    reasons: dict[str, int] = {}
    for f in failures:
        key = f[2].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    why = f" ({', '.join(f'{v} {k}' for k, v in sorted(reasons.items()))})" if reasons else ""
    final = listed_in or out_dir
    where = f", listed in {final / FAILURES}" if failures else ""
    log(f"{plan['split']}: {rows:,} images embedded, {len(failures):,} failed{why}{where}; "
        f"this run {n_embedded_now:,} images in {elapsed:.1f} s ({rate:,.0f} img/s) -> {final}")
    return manifest
