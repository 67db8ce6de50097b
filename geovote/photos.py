"""A gallery from a folder of your own geotagged photos (`python -m embed.build --photos DIR`).

`scan_photos(DIR)` walks DIR (any nesting) for JPEG, PNG, WebP, TIFF and HEIC/HEIF files (HEIC where
Pillow has a plugin for it), reads each photo's coordinates from its EXIF GPS block (degrees, minutes,
seconds with N/S/E/W references; altitude ignored), and returns the usable photos as a Split whose ids are
the paths relative to DIR, plus every rejected file with its reason: no GPS block, (0, 0) (cameras without
a fix write it), coordinates out of range, or not readable as an image. `coordinates_csv` (a CSV of
`path,latitude,longitude`, paths relative to DIR) gives coordinates for photos whose EXIF lacks them; the
CSV wins where both exist.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif")
GPS_IFD = 0x8825
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4


class PhotoError(ValueError):
    """A folder that cannot be a gallery, or a coordinates CSV that cannot be read."""


def dms_to_deg(dms, ref) -> float:
    """EXIF degrees/minutes/seconds (three rationals) and a reference letter to signed degrees."""
    d, m, s = (float(v) for v in dms)
    value = d + m / 60.0 + s / 3600.0
    ref = ref.decode() if isinstance(ref, bytes) else str(ref)
    return -value if ref.strip().upper() in ("S", "W") else value


def exif_latlon(path: Path) -> tuple[float, float] | str:
    """(lat, lon) from a photo's EXIF GPS block, or the reason there is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gps = im.getexif().get_ifd(GPS_IFD)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"not an image Pillow can read ({type(e).__name__})"
    if not gps or GPS_LAT not in gps or GPS_LON not in gps:
        return "no GPS coordinates in its EXIF"
    try:
        return (dms_to_deg(gps[GPS_LAT], gps.get(GPS_LAT_REF, "N")),
                dms_to_deg(gps[GPS_LON], gps.get(GPS_LON_REF, "E")))
    except (TypeError, ValueError, ZeroDivisionError):
        return "unreadable GPS coordinates in its EXIF"


def check_latlon(lat: float, lon: float) -> str:
    """'' for usable coordinates, else why not."""
    if not (np.isfinite(lat) and np.isfinite(lon)):
        return "coordinates not finite"
    if abs(lat) > 90 or abs(lon) > 180:
        return "coordinates out of range"
    if lat == 0 and lon == 0:
        return "GPS at (0, 0): a camera without a fix"
    return ""


def read_coordinates_csv(path: Path) -> dict[str, tuple[float, float]]:
    out = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "latitude", "longitude"} - set(reader.fieldnames or ())
            if missing:
                raise PhotoError(f"{path}: needs the columns path, latitude, longitude (missing "
                                 f"{', '.join(sorted(missing))})")
            for row in reader:
                try:
                    out[Path(row["path"]).as_posix()] = (float(row["latitude"]), float(row["longitude"]))
                except (TypeError, ValueError):
                    out[Path(row["path"] or "").as_posix()] = (float("nan"), float("nan"))
    except (OSError, UnicodeDecodeError) as e:
        raise PhotoError(f"{path}: unreadable ({e})") from None
    return out


def scan_photos(folder: str | Path, coordinates_csv: str | Path | None = None):
    """(Split of the usable photos, [(relative path, reason)] of the rejected ones), in path order."""
    from geovote.data import Report, Split

    root = Path(folder)
    if not root.is_dir():
        raise PhotoError(f"{root} is not a folder of photos")
    extra = read_coordinates_csv(Path(coordinates_csv)) if coordinates_csv else {}
    files = sorted(Path(dirpath, name) for dirpath, _, names in os.walk(root) for name in names
                   if name.lower().endswith(PHOTO_SUFFIXES))
    if not files:
        raise PhotoError(f"{root}: no photos in it or its sub-folders (looked for "
                         f"{', '.join(s.lstrip('.') for s in PHOTO_SUFFIXES)})")
    ids, lat, lon, size, mtime, rejected = [], [], [], [], [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        found = exif_latlon(path)  # opens the file: an unreadable one is rejected whatever the CSV says
        if not (isinstance(found, str) and found.startswith("not an image")) and rel in extra:
            found = extra[rel]
        if isinstance(found, str):
            rejected.append((rel, found))
            continue
        why = check_latlon(*found)
        if why:
            rejected.append((rel, why))
            continue
        stat = path.stat()
        ids.append(rel)
        lat.append(found[0])
        lon.append(found[1])
        size.append(stat.st_size)
        mtime.append(stat.st_mtime_ns)
    table = pa.table({"id": pa.array(ids, pa.string()), "latitude": pa.array(lat, pa.float64()),
                      "longitude": pa.array(lon, pa.float64()),
                      "path": pa.array(ids, pa.string()),  # relative to the root, as read_split's paths
                      # a photo edited in place keeps its path: these tell a rerun to embed it again
                      "size": pa.array(size, pa.int64()), "mtime_ns": pa.array(mtime, pa.int64())})
    report = Report(root / "(photos)")
    report.rows, report.valid = len(files), len(ids)
    for _, why in rejected:
        report.rejected[why] += 1
    return Split(root, "train", table, report), rejected


def write_rejects(path: Path, rejected: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(rejected)
    tmp.replace(path)
