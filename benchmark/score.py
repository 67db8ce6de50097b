"""Score a predictions file with OSV-5M's metrics.

    python -m benchmark.score PREDICTIONS --truth TEST_CSV [--json] [--subset]

PREDICTIONS is a CSV or parquet file with columns `id`, `latitude`, `longitude` (degrees). Predictions
and truth are joined on `id`. Every truth row needs a prediction (else: an error naming how many lack
one), unless --subset, which scores only the predicted rows; a prediction whose id is not in the truth is
an error. --json prints one JSON object with the keys of geovote.metrics.SCORE_KEYS (accuracies are
fractions in [0, 1]) plus `n_country`, `n_region`, `n_area`, `n_city`: the rows each admin accuracy was
computed over (rows whose truth key is missing are left out).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from geovote.data import ID, LAT, LON, DataError, csv_columns, read_table
from geovote.metrics import ACCURACY_RADII_KM, ADMIN_LEVELS, score


def read_predictions(path: Path) -> pa.Table:
    """id (string), latitude, longitude (float64) of a CSV or parquet file; refuses bad values."""
    if not path.is_file():
        raise DataError(f"no predictions file {path}")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}): truncated or "
                            "not parquet?") from None
        have = table.column_names
    else:
        have = csv_columns(path)
        table = None
    missing = [c for c in (ID, LAT, LON) if c not in have]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; it has: {', '.join(have)}")
    if table is None:
        try:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                include_columns=[ID, LAT, LON], column_types={ID: pa.string()}))
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: unreadable as CSV ({str(e).splitlines()[0]})") from None
        from geovote.csvsafe import uncell

        ids = table.column(ID).to_pylist()  # a spreadsheet-safe id (geovote.csvsafe) back to the id itself
        table = table.set_column(0, ID, pa.array([None if i is None else uncell(i) for i in ids],
                                                 pa.string()))
    if table.num_rows == 0:
        raise DataError(f"{path} holds no predictions (a header only)")
    try:
        table = pa.table({ID: pc.cast(table.column(ID), pa.string()),
                          LAT: pc.cast(table.column(LAT), pa.float64()),
                          LON: pc.cast(table.column(LON), pa.float64())})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: cannot read ids as text and coordinates as numbers ({e})") from None
    lat, lon = table.column(LAT).to_numpy(), table.column(LON).to_numpy()
    bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > 90) | (np.abs(lon) > 180)
    bad |= table.column(ID).is_null().to_numpy(zero_copy_only=False)
    if bad.any():
        first = table.column(ID)[int(np.flatnonzero(bad)[0])].as_py()
        raise DataError(f"{path}: {int(bad.sum())} predictions lack an id or have coordinates that are "
                        f"missing or out of range (first: id {first!r})")
    n_unique = len(pc.unique(table.column(ID)))
    if n_unique != table.num_rows:
        raise DataError(f"{path}: {table.num_rows - n_unique} duplicate ids")
    return table


def score_file(pred_path: Path, truth_csv: Path, subset: bool = False) -> dict:
    preds = read_predictions(Path(pred_path))
    key_cols = [c for c in ADMIN_LEVELS.values() if c in csv_columns(Path(truth_csv))]
    truth, report = read_table(Path(truth_csv), key_cols)
    if sum(report.rejected.values()):
        print(f"warning: {report.summary()}; those rows are not scored", file=sys.stderr)
    pos = pc.fill_null(pc.index_in(truth.column(ID), value_set=preds.column(ID)), -1).to_numpy()
    unknown = preds.num_rows - int((pos >= 0).sum())
    if unknown:
        raise DataError(f"{pred_path}: {unknown} predictions have ids that are not in {truth_csv}")
    if (pos < 0).any():
        if not subset:
            raise DataError(f"{int((pos < 0).sum())} of {truth.num_rows} rows of {truth_csv} have no "
                            f"prediction in {pred_path} (pass --subset to score only predicted rows)")
        truth = truth.filter(pa.array(pos >= 0))
        pos = pos[pos >= 0]
    preds = preds.take(pa.array(pos))
    keys = {c: truth.column(c).to_numpy(zero_copy_only=False) for c in key_cols}
    return score(preds.column(LAT).to_numpy(), preds.column(LON).to_numpy(),
                 truth.column(LAT).to_numpy(), truth.column(LON).to_numpy(), keys)


def format_table(result: dict) -> str:
    pct = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}%"  # noqa: E731
    rows = [("images", f"{result['n']:,}"), ("GeoScore", f"{result['geoscore']:.1f}"),
            ("mean distance", f"{result['mean_km']:.1f} km"),
            ("median distance", f"{result['median_km']:.1f} km")]
    rows += [(f"within {r} km", pct(result[f"acc_{r}km"])) for r in ACCURACY_RADII_KM]
    rows += [(f"{level} accuracy", f"{pct(result[f'acc_{level}'])} of {result[f'n_{level}']:,}")
             for level in ADMIN_LEVELS]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(result: dict) -> str:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    return json.dumps(clean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--truth", type=Path, required=True, help="the split's CSV (OSV-5M columns)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--subset", action="store_true", help="score only the truth rows predicted")
    args = ap.parse_args(argv)
    try:
        result = score_file(args.predictions, args.truth, args.subset)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_json(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
