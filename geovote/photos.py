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

from geovote import csvsafe

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif")
GPS_IFD = 0x8825
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4
REFS = {"latitude": ("N", "S"), "longitude": ("E", "W")}  # (positive, negative)


class PhotoError(ValueError):
    """A folder that cannot be a gallery, or a coordinates CSV that cannot be read."""


class GpsError(ValueError):
    """EXIF GPS values that are there but are not coordinates; the message is the reject's reason."""


def dms_to_deg(dms, ref, axis: str) -> float:
    """EXIF degrees/minutes/seconds (three non-negative rationals) and the reference letter of `axis`
    (N or S for latitude, E or W for longitude; bytes or text, any case, padded or not) to signed
    degrees. GpsError (a ValueError), saying what is wrong, for anything else: a missing or foreign
    reference, a reference of another type (a SHORT), negative components."""
    positive, negative = REFS[axis]
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    if ref is None:
        raise GpsError(f"no {axis} reference ({positive}/{negative}) in its EXIF GPS")
    letter = ref.strip("\x00 \t").upper() if isinstance(ref, str) else None
    if letter not in (positive, negative):
        raise GpsError(f"{axis} reference {ref!r} in its EXIF GPS is not {positive} or {negative}")
    if len(dms) != 3:
        raise GpsError(f"{axis} in its EXIF GPS is not degrees, minutes, seconds")
    d, m, s = (float(v) for v in dms)
    if min(d, m, s) < 0:
        raise GpsError(f"{axis} in its EXIF GPS has a negative component (the sign belongs in the "
                       "reference)")
    value = d + m / 60.0 + s / 3600.0
    return -value if letter == negative else value


def exif_latlon(path: Path) -> tuple[float, float] | str:
    """(lat, lon) from a photo's EXIF GPS block, or the reason there is none."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF is said in the reason, not printed
            with Image.open(path) as im:
                gps = im.getexif().get_ifd(GPS_IFD)
    except Image.DecompressionBombError as e:
        return f"too large to open ({e})"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"not an image Pillow can read ({type(e).__name__})"
    if not gps or GPS_LAT not in gps or GPS_LON not in gps:
        return "no GPS coordinates in its EXIF"
    try:
        return (dms_to_deg(gps[GPS_LAT], gps.get(GPS_LAT_REF), "latitude"),
                dms_to_deg(gps[GPS_LON], gps.get(GPS_LON_REF), "longitude"))
    except GpsError as e:
        return str(e)
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


def _number(text: str | None, name: str) -> float | str:
    """A coordinate from a CSV cell, or why it is not one."""
    try:
        return float(text)
    except (TypeError, ValueError):
        hint = ": a decimal comma? write 48.85, not 48,85" if text and "," in text else ""
        return f"{name} is not a number ({text!r}{hint})"


def read_coordinates_csv(path: Path) -> dict[str, tuple[float, float] | str]:
    """{path relative to the folder: (lat, lon), or why the row's coordinates cannot be used}. A UTF-8
    byte order mark is accepted; Windows separators in a path are read as `/`."""
    out: dict[str, tuple[float, float] | str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"path", "latitude", "longitude"} - set(reader.fieldnames or ())
            if missing:
                raise PhotoError(f"{path}: needs the columns path, latitude, longitude (missing "
                                 f"{', '.join(sorted(missing))})")
            for row in reader:
                rel = Path((row["path"] or "").replace("\\", "/")).as_posix()
                lat, lon = _number(row["latitude"], "latitude"), _number(row["longitude"], "longitude")
                why = next((v for v in (lat, lon) if isinstance(v, str)), None)
                out[rel] = why.replace(" (", f" in {path.name} (", 1) if why else (lat, lon)
    except (OSError, UnicodeDecodeError) as e:
        raise PhotoError(f"{path}: unreadable ({e})") from None
    return out


def _walk(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(photo files under root, [(relative path, why)] of what could not be listed or is no photo
    file): folders that cannot be read, and entries with a photo's name that are not regular files
    (a FIFO named x.jpg would block the build for ever once opened)."""
    import stat

    unreadable: list[tuple[str, str]] = []

    def failed(e: OSError) -> None:
        where = Path(e.filename) if e.filename else root
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
        unreadable.append((rel + "/", f"folder could not be read ({e.strerror or type(e).__name__}): "
                                      "its photos were not looked at"))

    files = []
    for dirpath, _, names in os.walk(root, onerror=failed):
        for name in names:
            if not name.lower().endswith(PHOTO_SUFFIXES):
                continue
            path = Path(dirpath, name)
            try:
                mode = os.stat(path).st_mode  # after links
            except OSError as e:
                unreadable.append((path.relative_to(root).as_posix(),
                                   f"could not be read ({e.strerror or type(e).__name__})"))
                continue
            if not stat.S_ISREG(mode):
                unreadable.append((path.relative_to(root).as_posix(),
                                   "not a regular file (a FIFO, socket or device): skipped unopened"))
                continue
            files.append(path)
    return sorted(files), unreadable


def scan_photos(folder: str | Path, coordinates_csv: str | Path | None = None):
    """(Split of the usable photos, [(relative path, reason)] of the rejected ones), in path order. A
    coordinates CSV row that names no photo of the folder is listed too, as are folders that could not
    be read."""
    from geovote.data import Report, Split

    root = Path(folder)
    if not root.is_dir():
        raise PhotoError(f"{root} is not a folder of photos")
    extra = read_coordinates_csv(Path(coordinates_csv)) if coordinates_csv else {}
    files, rejected = _walk(root)
    n_unlisted = sum(1 for rel, _ in rejected if not rel.endswith("/"))  # files that could not be used
    seen = {rel for rel, _ in rejected}  # a CSV row naming one of these is not a row for no photo
    if not files and not rejected:
        raise PhotoError(f"{root}: no photos in it or its sub-folders (looked for "
                         f"{', '.join(s.lstrip('.') for s in PHOTO_SUFFIXES)})")
    ids, lat, lon, size, mtime = [], [], [], [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        seen.add(rel)
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            rejected.append((rel, "file name is not valid UTF-8: rename it"))
            continue
        found = exif_latlon(path)  # opens the file: an unreadable one is rejected whatever the CSV says
        if not (isinstance(found, str) and found.startswith(("not an image", "too large"))) and rel in extra:
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
    if coordinates_csv:
        name = Path(coordinates_csv).name
        rejected += [(rel, f"named in {name}, but no photo of the folder has this path")
                     for rel in sorted(set(extra) - seen)]
    if not files:
        raise PhotoError(f"{root}: no photo could be listed ({len(rejected)} problem(s), first: "
                         f"{rejected[0][0]}: {rejected[0][1]})")
    rejected.sort(key=lambda r: r[0])
    table = pa.table({"id": pa.array(ids, pa.string()), "latitude": pa.array(lat, pa.float64()),
                      "longitude": pa.array(lon, pa.float64()),
                      "path": pa.array(ids, pa.string()),  # relative to the root, as read_split's paths
                      # a photo edited in place keeps its path: these tell a rerun to embed it again
                      "size": pa.array(size, pa.int64()), "mtime_ns": pa.array(mtime, pa.int64())})
    report = Report(root / "(photos)")
    report.rows, report.valid = len(files) + n_unlisted, len(ids)
    for _, why in rejected:
        report.rejected[why.split(" (")[0]] += 1  # counted without the particulars in parentheses
    return Split(root, "train", table, report, images="photos"), rejected


def write_rejects(path: Path, rejected: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(csvsafe.row(r) for r in rejected)
    tmp.replace(path)
