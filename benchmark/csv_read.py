"""Reading a 5M-row, ~3 GB OSV-5M train.csv: time and peak memory, ours against reading it whole.

    python -m benchmark.csv_read [--rows 5000000] [--workdir DIR]   (default: the system temp dir)

Generates an OSV-5M-shaped CSV (all 37 columns, realistic widths) once, then measures in fresh
processes, side by side:
  - ours: `geovote.data.read_table` streaming the columns a stage needs (id and coordinates; or those
    and the four unique_* keys), validating every row;
  - whole: `pyarrow.csv.read_csv` of the whole file, the obvious alternative (pandas would be larger).
Peak memory is the child process's maximum resident set size. Then the CSV block size (`--blocks-mib`):
streaming alone, the most Arrow memory in flight, since pyarrow parses several blocks ahead.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

KEY_COLUMNS = ["unique_country", "unique_region", "unique_sub-region", "unique_city"]
CHUNK_ROWS = 250_000


def _chunk(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    s = lambda a: pa.array(np.asarray(a).astype(str))  # noqa: E731
    ids = np.arange(start, start + n, dtype=np.int64) * 7919 + 10**14
    lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    cc = np.array(["FR", "US", "BR", "NA", "JP", "ZA", "IN", "RU"])[rng.integers(0, 8, n)]
    region = np.char.add("Region ", rng.integers(0, 3000, n).astype(str))
    sub = np.char.add("Sub-region number ", rng.integers(0, 40000, n).astype(str))
    city = np.char.add("Some City ", rng.integers(0, 140000, n).astype(str))
    cols = {
        "id": s(ids), "latitude": lat, "longitude": lon,
        # real thumbnail URLs are long signed links, most of a row's ~600 bytes
        "thumb_original_url": s(np.char.add(np.char.add(
            "https://scontent.example.net/m1/v0.1/thumb-orig/AQ",
            rng.integers(10**17, 10**18, n).astype(str)),
            "?stp=s1024x768&_nc_cat=1&ccb=1-7&_nc_sid=201f8b&_nc_ohc=Xy2kQ7mZtF8AX9aBcDe&_nc_ht=scontent"
            "&oh=00_AYCqLKs8hUvV2m3nR4t5W6x7Y8z9A0b1C2d3E4f5G6h7I8&oe=65A1B2C3")),
        "sequence": s(np.char.add("seq_", rng.integers(10**17, 10**18, n).astype(str))),
        "captured_at": rng.integers(1.3e12, 1.7e12, n),
        "creator_username": s(np.char.add("user", rng.integers(0, 10**6, n).astype(str))),
        "creator_id": s(rng.integers(10**14, 10**15, n)),
        "country": s(cc), "region": s(region), "sub-region": s(sub), "city": s(city),
        "lon_bin": rng.integers(0, 100, n), "lat_bin": rng.integers(0, 100, n),
        "cell": s(np.char.add("(", np.char.add(rng.integers(0, 100, n).astype(str), ", 12)"))),
        "land_cover": rng.integers(0, 11, n), "climate": rng.integers(0, 30, n),
        "soil": rng.integers(0, 15, n), "road_index": rng.uniform(0, 8, n),
        "drive_side": rng.integers(0, 2, n), "dist_sea": rng.uniform(0, 10, n),
        **{f"quadtree_10_{k}": rng.integers(0, 10**4, n)
           for k in (500, 1000, 2500, 5000, 12500, 25000, 50000)},
        "unique_country": s(cc),
        "unique_region": s(np.char.add(np.char.add(region, "_"), cc)),
        "unique_sub-region": s(np.char.add(np.char.add(sub, "_"), np.char.add(np.char.add(region, "_"), cc))),
        "unique_city": s(np.char.add(np.char.add(city, "_"), np.char.add(np.char.add(sub, "_"), cc))),
    }
    return pa.table(cols)


def make_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = None
    for start in range(0, rows, CHUNK_ROWS):
        t = _chunk(rng, start, min(CHUNK_ROWS, rows - start))
        if writer is None:
            writer = pacsv.CSVWriter(tmp, t.schema)
        writer.write_table(t)
    writer.close()
    tmp.rename(path)


def _child(mode: str, path: str) -> None:
    t0 = time.perf_counter()
    if mode.startswith("stream-"):  # streaming alone: Arrow memory in flight for one block size
        from geovote.data import REQUIRED_COLUMNS, iter_csv_batches

        rows, in_flight = 0, 0
        for batch in iter_csv_batches(Path(path), [*REQUIRED_COLUMNS, *KEY_COLUMNS],
                                      block_bytes=int(mode.split("-")[1])):
            rows += batch.num_rows
            in_flight = max(in_flight, pa.total_allocated_bytes())
        print(json.dumps({"mode": mode, "rows": rows, "seconds": time.perf_counter() - t0,
                          "in_flight_mib": in_flight / 2**20}))
        return
    if mode.startswith("ours"):
        from geovote.data import read_table

        table, report = read_table(Path(path), KEY_COLUMNS if mode == "ours-keys" else ())
        rows = report.valid
    else:
        table = pacsv.read_csv(path)
        rows = table.num_rows
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"mode": mode, "rows": rows, "seconds": seconds, "peak_mib": peak_mib,
                      "table_mib": table.nbytes / 2**20}))


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmark.csv_read", "--child", mode, str(path)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.csv_read", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geovote-csv")
    ap.add_argument("--blocks-mib", type=int, nargs="*", default=[1, 4, 16],
                    help="CSV block sizes to compare, streaming alone")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    path = args.workdir / f"train_{args.rows}.csv"
    if not path.exists():
        t0 = time.perf_counter()
        make_csv(path, args.rows)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size_gb = path.stat().st_size / 1e9
    ours, ours_keys, whole = measure("ours", path), measure("ours-keys", path), measure("whole", path)
    print(f"{args.rows:,}-row train.csv, {size_gb:.2f} GB")
    print(f"{'reader':<44} {'seconds':>8} {'rows/s':>11} {'peak RSS MiB':>13}")
    for name, r in (("geovote read_table (id, lat, lon)", ours),
                    ("geovote read_table (id, lat, lon, 4 keys)", ours_keys),
                    ("pyarrow read_csv, whole file", whole)):
        print(f"{name:<44} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>11,.0f} {r['peak_mib']:>13,.0f}"
              f"   (table kept: {r['table_mib']:,.0f} MiB)")
    for name, r in (("id, lat, lon", ours), ("with keys", ours_keys)):
        print(f"peak memory ours ({name}) / whole: {r['peak_mib'] / whole['peak_mib']:.2f}; "
              f"/ file size: {r['peak_mib'] * 2**20 / path.stat().st_size:.2f}; "
              f"speed ours / whole: {whole['seconds'] / r['seconds']:.1f}x")
    if args.blocks_mib:
        print(f"\nstreaming id, lat, lon, 4 keys alone, by CSV block size\n{'block':>8} {'seconds':>8} "
              f"{'Arrow MiB in flight':>20}")
        for mib in args.blocks_mib:
            r = measure(f"stream-{mib << 20}", path)
            print(f"{mib:>5} MiB {r['seconds']:>8.1f} {r['in_flight_mib']:>20,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
