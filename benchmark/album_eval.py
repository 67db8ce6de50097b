"""The images of capture sequences only, from a benchmark.run folder that scored geovote and
geovote-sequence: each photo alone, the most confident photo's answer for its whole sequence, the
best photo's answer for its whole sequence (an oracle: the truth picks it), and the joint answer.

    python -m benchmark.album_eval RUN_FOLDER [--data DIR]

Every row is the mean GeoScore over the sequences' images (each against its own place) with its
bootstrap 95% interval over sequences; the joint answer's P(within 200 km) calibration error beside the
most confident photo's own. Reads `<run>/<split>/predictions/{geovote,geovote-sequence}.parquet` and the
split's CSV (its `sequence` column).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _read(folder: Path, method: str) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(folder / "predictions" / f"{method}.parquet").to_pydict()
    return {k: np.asarray(v) for k, v in t.items()}


def sequence_scores(folder: Path, data: Path, split: str, boot: int = 1000, seed: int = 0) -> dict:
    from geovote.data import read_split
    from geovote.geo import haversine_km
    from geovote.metrics import calibration_error, geoscore
    from retrieve.album import groups

    alone, joint = _read(folder, "geovote"), _read(folder, "geovote-sequence")
    truth = read_split(data, split, columns=["sequence"], check_images=False)
    pos = {i: j for j, i in enumerate(truth.ids.astype(str))}
    rows = np.array([pos[i] for i in alone["id"]])
    if not np.array_equal(alone["id"], joint["id"]):
        raise ValueError(f"{folder}: geovote and geovote-sequence predicted different images")
    lat, lon = truth.lat_deg[rows], truth.lon_deg[rows]
    seqs = [g for g in groups(truth.text_column("sequence")[rows]) if len(g) > 1]
    if not seqs:
        raise ValueError(f"{folder}: the {split} split has no capture sequence of 2 or more scored images")
    if "within_200km" not in alone or "within_200km" not in joint:
        raise ValueError(f"{folder}: the engine was not calibrated (no within_200km in its predictions)")

    def g_of(plat, plon, idx):
        return geoscore(haversine_km(plat, plon, lat[idx], lon[idx]))

    per = {name: [] for name in ("alone", "most confident photo", "best photo (oracle)", "together")}
    for idx in seqs:
        per["alone"].append(g_of(alone["latitude"][idx], alone["longitude"][idx], idx).mean())
        top = idx[np.argmax(alone["within_200km"][idx])]
        per["most confident photo"].append(g_of(alone["latitude"][top], alone["longitude"][top], idx).mean())
        per["best photo (oracle)"].append(max(g_of(alone["latitude"][j], alone["longitude"][j], idx).mean()
                                              for j in idx))
        per["together"].append(g_of(joint["latitude"][idx], joint["longitude"][idx], idx).mean())
    sizes = np.array([len(s) for s in seqs], float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(seqs), (boot, len(seqs)))
    out = {"sequences": len(seqs), "images": int(sizes.sum())}
    for name, v in per.items():
        v = np.asarray(v)
        boots = (v[picks] * sizes[picks]).sum(1) / sizes[picks].sum(1)  # image-weighted, as benchmark.run
        out[name] = {"geoscore": float((v * sizes).sum() / sizes.sum()),
                     "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
    idx = np.concatenate(seqs)
    d = haversine_km(joint["latitude"][idx], joint["longitude"][idx], lat[idx], lon[idx])
    out["together"]["ece_200km"] = calibration_error(joint["within_200km"][idx], d <= 200)
    best = np.concatenate([[s[np.argmax(alone["within_200km"][s])]] * len(s) for s in seqs])
    d_best = haversine_km(alone["latitude"][best], alone["longitude"][best], lat[idx], lon[idx])
    out["most confident photo"]["ece_200km"] = calibration_error(alone["within_200km"][best], d_best <= 200)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.album_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a benchmark.run folder (with geovote and geovote-sequence)")
    ap.add_argument("--data", type=Path, default=None, help="the dataset it scored (default: its own record)")
    args = ap.parse_args(argv)
    folders = [f for f in (args.run, *sorted(args.run.iterdir())) if (f / "results.json").is_file()]
    if not folders:
        print(f"error: {args.run}: no results.json in it or its split folders", file=sys.stderr)
        return 2
    for folder in folders:
        meta = json.loads((folder / "results.json").read_text())
        data = args.data or Path(meta["data"])
        try:
            got = sequence_scores(folder, data, meta["split"])
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{meta['split']}: {got['images']:,} images in {got['sequences']:,} sequences")
        for name in ("alone", "most confident photo", "best photo (oracle)", "together"):
            r = got[name]
            ece = f"; P(200 km) calibration error {r['ece_200km']:.3f}" if "ece_200km" in r else ""
            print(f"  {name:22s} GeoScore {r['geoscore']:.0f} ({r['ci95'][0]:.0f}-{r['ci95'][1]:.0f}){ece}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
