"""Scoring and reporting a benchmark run: OSV-5M's metrics with bootstrap intervals, the run folder.

Writes: results.json (`methods`: a list of {name, the keys of benchmark.score --json, 95% bootstrap
intervals}), results.csv, results.md, predictions/<method>.parquet (readable by benchmark.score),
accuracy_vs_distance.png and error_map.png.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from geovote.geo import haversine_km
from geovote.metrics import ADMIN_LEVELS, SCORE_KEYS, geoscore, score


# ------------------------------------------------------------------------------------------- scoring
def bootstrap_ci(values: np.ndarray, n: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of `values` over `n` resamples (NaN rows left out)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0 or n <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.array([v[rng.integers(0, len(v), len(v))].mean() for _ in range(n)])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def score_method(plat, plon, tlat, tlon, true_keys: dict, bootstrap: int, seed: int) -> dict:
    from geovote.geocode import reverse_geocode_keys

    pred_keys = reverse_geocode_keys(np.nan_to_num(plat), np.nan_to_num(plon))
    out = score(plat, plon, tlat, tlon, true_keys, pred_keys)
    d = haversine_km(plat, plon, tlat, tlon)
    out["geoscore_ci95"] = bootstrap_ci(geoscore(d), bootstrap, seed)
    col = ADMIN_LEVELS["country"]
    if col in true_keys:
        true = np.asarray(true_keys[col], dtype=object)
        present = np.array([k is not None and k == k for k in true])
        hit = np.where(present, pred_keys[col] == true, np.nan).astype(float)
        out["acc_country_ci95"] = bootstrap_ci(hit, bootstrap, seed)
    return out


def calibration_report(extras: dict, plat, plon, tlat, tlon) -> dict:
    """How far the engine's probabilities can be trusted, on this split: expected calibration error of
    each within_km level, the coverage of radius_km, the accuracy within 200 km against the share of
    most confident images answered (and the area under that curve)."""
    from geovote.metrics import accuracy_vs_coverage, calibration_error
    from retrieve.calibrate import LEVELS_KM, RADIUS_PROBABILITY

    d = haversine_km(plat, plon, tlat, tlon)
    ok = np.isfinite(d)
    within, radius, conf = extras["within_km"][ok], extras["radius_km"][ok], extras["confidence"][ok]
    d = d[ok]
    cov, acc, auc = accuracy_vs_coverage(conf, d <= 200)
    half = int(np.ceil(len(acc) / 2)) - 1
    from retrieve.candidates import KINDS

    kinds = {}
    if "kind" in extras:  # which candidates answered
        kind = extras["kind"][ok]
        kinds = {"answer_kinds": {name: float((kind == i).mean()) for i, name in enumerate(KINDS)}}
    return {
        **kinds,
        "ece": {str(km): calibration_error(within[:, j], d <= km) for j, km in enumerate(LEVELS_KM)},
        "mean_probability": {str(km): float(within[:, j].mean()) for j, km in enumerate(LEVELS_KM)},
        "observed": {str(km): float((d <= km).mean()) for km in LEVELS_KM},
        "radius_probability": RADIUS_PROBABILITY,
        "radius_coverage": float((d <= radius).mean()),
        "median_radius_km": float(np.median(radius)),
        "acc_200km_most_confident_half": float(acc[half]) if len(acc) else float("nan"),
        "auc_acc_200km_vs_coverage": auc,
    }


def plot_calibration(out: Path, extras: dict, plat, plon, tlat, tlon, split: str) -> None:
    """reliability.png (predicted against observed, per within_km level) and accuracy_vs_coverage.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geovote.metrics import accuracy_vs_coverage, reliability
    from retrieve.calibrate import LEVELS_KM

    d = haversine_km(plat, plon, tlat, tlon)
    ok = np.isfinite(d)
    within, conf, d = extras["within_km"][ok], extras["confidence"][ok], d[ok]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    for j, km in enumerate(LEVELS_KM):
        mp, freq, n = reliability(within[:, j], d <= km)
        keep = n > 0
        ax.plot(mp[keep], freq[keep], marker="o", label=f"within {km:,} km")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"geovote reliability on {split}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    cov, acc, auc = accuracy_vs_coverage(conf, d <= 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(100 * cov, 100 * acc, lw=2)
    ax.set_xlabel("most confident images answered (%)")
    ax.set_ylabel("of those, within 200 km (%)")
    ax.set_title(f"geovote on {split}: accuracy against coverage (area {auc:.3f})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_coverage.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ outputs
def write_outputs(out: Path, results: list[dict], preds: dict, ids, tlat, tlon, meta: dict,
                  extras: dict | None = None) -> None:
    """`extras`: per method, more columns for its predictions file (the engine's probabilities)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieve.calibrate import LEVELS_KM
    from retrieve.candidates import KINDS

    (out / "predictions").mkdir(parents=True, exist_ok=True)
    for name, (plat, plon) in preds.items():
        cols = {"id": pa.array(list(ids), pa.string()), "latitude": plat, "longitude": plon}
        more = (extras or {}).get(name)
        if more:
            cols |= {"confidence": more["confidence"], "radius_km": more["radius_km"],
                     **{f"within_{km}km": more["within_km"][:, j] for j, km in enumerate(LEVELS_KM)},
                     **({"kind": pa.array([KINDS[k] if k >= 0 else None for k in more["kind"]], pa.string())}
                        if "kind" in more else {})}
        pq.write_table(pa.table(cols), out / "predictions" / f"{name}.parquet")
    (out / "results.json").write_text(json.dumps({**meta, "methods": results}, indent=2) + "\n")
    cols = ["name", *SCORE_KEYS, "geoscore_ci95", "acc_country_ci95"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for c in cols])
    (out / "results.md").write_text(markdown_table(results, meta) + "\n")
    plot(out, preds, tlat, tlon)


def markdown_table(results: list[dict], meta: dict) -> str:
    head = ("| method | GeoScore (95% CI) | mean km | median km | 1 km | 25 km | 200 km | 750 km | 2500 km "
            "| country (95% CI) | region | area | city |")
    lines = [f"{meta['split']} split of {meta['data']}: {meta['n']:,} images; engine {meta['engine']}", "",
             head, "|" + "---|" * 13]

    def pct(v):
        return "" if v is None or v != v else f"{100 * v:.1f}"

    for r in results:
        g, c = r["geoscore_ci95"], r.get("acc_country_ci95", [float("nan")] * 2)
        lines.append(
            f"| {r['name']} | {r['geoscore']:.0f} ({g[0]:.0f}-{g[1]:.0f}) | {r['mean_km']:,.0f} | "
            f"{r['median_km']:,.0f} | " + " | ".join(pct(r[f"acc_{k}km"]) for k in (1, 25, 200, 750, 2500))
            + f" | {pct(r['acc_country'])} ({pct(c[0])}-{pct(c[1])}) | {pct(r['acc_region'])} | "
            f"{pct(r['acc_area'])} | {pct(r['acc_city'])} |")
    for key, who in (("calibration", "geovote"), ("calibration_sequence", "geovote-sequence")):
        lines += _calibration_lines(meta.get(key), who)
    return "\n".join(lines)


def _calibration_lines(cal: dict | None, who: str) -> list[str]:
    lines = []
    if cal:
        lines += ["", f"{who}'s probabilities on this split: expected calibration error "
                  + ", ".join(f"{km} km {v:.3f}" for km, v in cal["ece"].items())
                  + f"; the 90% radius (median {cal['median_radius_km']:,.0f} km) holds "
                  f"{100 * cal['radius_coverage']:.1f}% of the truths; the most confident half is within "
                  f"200 km "
                  f"{100 * cal['acc_200km_most_confident_half']:.1f}% of the time (area under accuracy "
                  f"against coverage {cal['auc_acc_200km_vs_coverage']:.3f})"
                  + ("; answers by kind: " + ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%"
                                                      for k, v in cal["answer_kinds"].items())
                     if "answer_kinds" in cal else "")]
    return lines


def plot(out: Path, preds: dict, tlat, tlon) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = np.logspace(0, np.log10(20_000), 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (plat, plon) in preds.items():
        d = haversine_km(plat, plon, tlat, tlon)
        ax.plot(radii, [(d < r).mean() for r in radii], label=name, lw=2 if name == "geovote" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("distance to the truth (km)")
    ax.set_ylabel("share of images within")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_distance.png", dpi=110)
    plt.close(fig)
    if "geovote" in preds:
        from geovote.bundled_sample import blue_marble

        plat, plon = preds["geovote"]
        d = haversine_km(plat, plon, tlat, tlon)
        fig, ax = plt.subplots(figsize=(10, 5.2))
        ax.imshow(blue_marble(), extent=(-180, 180, -90, 90), alpha=0.6)
        sc = ax.scatter(tlon, tlat, c=np.log10(np.maximum(d, 1)), s=6, cmap="plasma", vmin=0, vmax=4.3)
        fig.colorbar(sc, ax=ax, label="log10 error (km)", fraction=0.025)
        ax.set_title("geovote: error at each test image's true location")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        fig.tight_layout()
        fig.savefig(out / "error_map.png", dpi=110)
        plt.close(fig)
