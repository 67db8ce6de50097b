"""Where was this photo taken? Embed it, find its nearest training images, let them vote.

    python -m retrieve.query photo.jpg [more.jpg | folder ...]     # for people
    python -m retrieve.query photo.jpg --json                      # one JSON object per image and line
    python -m retrieve.query --split test --data data/sample        # a whole split -> predictions parquet
    python -m retrieve.query a.jpg b.jpg c.jpg --together           # photos of one place: one answer
    python -m retrieve.query --albums albums.csv --json             # many albums (columns album,image)

--index defaults to the bundled sample's index, built by `python -m embed.build`. An unreadable image gets
a one-line error naming it; the others are still answered, and the exit code is 1 if any failed.
--json keys: image, latitude, longitude, confidence, calibrated, within_km, radius_km, expected_geoscore,
kind, far_pick, country, region, sub_region, city, candidates (a list of {latitude, longitude, score}, the
answer first).
The answer is the candidate (the vote's peaks, the far pick, the nearest gallery places) of highest
expected GeoScore under its own distance distribution, fitted on the tuning split by `retrieve.tune`:
`confidence` is the probability that the true place is within 200 km of it; `within_km` gives it for 1,
25, 200, 750 and 2500 km ({"1": p, ...}), `radius_km` the radius holding the true place with 90%
probability, `expected_geoscore` its expected GeoScore, `kind` which candidate it is (peak, runner_up,
far_pick, neighbour; `far_pick` true for the last but one), and each candidate's `score` its own
probability within 200 km. An engine not tuned answers `calibrated: false`, the vote's peak, the raw
vote share as confidence, and null within_km and radius_km.
--together and --albums answer each album once from all its photos (retrieve.album): the same keys, plus
`images`, `album` (--albums), `spread_km` (how far apart its photos may be; --spread-km, default the
tuned one), `best_single_within_200km` (the most confident photo's own probability) and `photos` (each
photo's own answer and its `agreement`: its support within 200 km of the album's answer; a photo of
somewhere else has little). Albums of photos are calibrated where tuning had capture sequences to fit
them on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embed.models import BackboneError
from geovote.config import ConfigError
from geovote.csvsafe import printable
from geovote.data import DataError
from geovote.layout import EngineMissing
from geovote.paths import default_sample_root, folder_problem
from index.search import IndexError_
from retrieve.answer import album_answers, answers, predict_split
from retrieve.engine import Engine
from retrieve.region import RegionError, parse_region
from retrieve.share import ShareError, resolve_engine

SPLIT_SUFFIXES = (".parquet", ".csv", ".geojson")  # --split --out: predictions as a table or map points
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def expand(inputs: list[str]) -> list[Path]:
    """Files as given; folders replaced by the images inside them, sorted."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def osm_link(lat: float, lon: float, zoom: int = 10) -> str:
    return f"https://www.openstreetmap.org/?mlat={lat:.5f}&mlon={lon:.5f}#map={zoom}/{lat:.5f}/{lon:.5f}"


def _place(answer: dict) -> str:
    return ", ".join(x for x in (answer["city"], answer["region"], answer["country"]) if x)


def _how_sure(answer: dict, raw: str) -> str:
    """The answer's probabilities in words; `raw` names the score of an uncalibrated one."""
    conf = answer["confidence"]
    if answer["calibrated"] and answer["radius_km"] is not None:
        return f"{conf:.0%} probability within 200 km; 90% within {answer['radius_km']:,.0f} km"
    return f"{raw} {conf:.0%}, not calibrated"


def human(answer: dict, top: int) -> str:
    lat, lon = answer["latitude"], answer["longitude"]
    place, how_sure = _place(answer), _how_sure(answer, "vote share")
    lines = [f"{answer['image']}: {lat:.5f}, {lon:.5f}  near {place}  ({how_sure})",
             f"  map: {osm_link(lat, lon)}"]
    if answer.get("far_pick"):
        lines.append("  looks far from every training image: answered by the neighbour that fits best once "
                     "the gallery's density is discounted")
    alts = answer["candidates"][1:top]
    if alts:
        from geovote.geo import haversine_km
        from geovote.geocode import reverse_geocode

        where = reverse_geocode([c["latitude"] for c in alts], [c["longitude"] for c in alts])
        lines.append("  alternatives:")
        for i, c in enumerate(alts):
            d = float(haversine_km(lat, lon, c["latitude"], c["longitude"]))
            lines.append(f"    {c['latitude']:.4f}, {c['longitude']:.4f}  near {where['city'][i]}, "
                         f"{where['country'][i]}  ({c['score']:.0%}, {d:,.0f} km away)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieve.query", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="image files or folders of images")
    ap.add_argument("--index", default=None,
                    help="index folder (default: the sample's), or a published engine: hf-hub:ORG/NAME[@REV]")
    ap.add_argument("--model", default=None, help="override the model the index names")
    ap.add_argument("--top", type=int, default=3, help="answers to show: the best and N-1 alternatives")
    ap.add_argument("--json", action="store_true", help="one JSON object per image and line")
    ap.add_argument("--format", choices=("text", "json", "geojson", "csv"), default=None,
                    help="text (default), json (= --json), geojson (one FeatureCollection: a Point per "
                         "image, for QGIS, kepler.gl, geojson.io) or csv (a table)")
    ap.add_argument("--tta", action="store_true", help="average with the mirrored image")
    ap.add_argument("--evidence", type=int, default=0, metavar="N",
                    help="with --json/--format: the N nearest gallery images behind each answer (id, "
                         "coordinates, similarity, the image file)")
    ap.add_argument("--within", metavar="CC[,CC...]",
                    help="answer only from training images in these countries (ISO 3166 alpha-2), and inside")
    ap.add_argument("--bbox", metavar="S,W,N,E",
                    help="answer only from training images in this box (degrees; W > E: across 180; "
                         "--bbox=S,W,N,E when S is negative)")
    ap.add_argument("--together", action="store_true",
                    help="the images are photos of one place (an album, a clip): answer once from all")
    ap.add_argument("--albums", type=Path, metavar="FILE",
                    help="a CSV with columns album,image (paths relative to the CSV): one answer per album")
    ap.add_argument("--spread-km", type=float, default=None,
                    help="with --together/--albums: how far apart an album's photos may be (default: tuned)")
    ap.add_argument("--split", help="predict a whole split of --data instead of images")
    ap.add_argument("--data", type=Path, help="dataset root for --split (default: the sample)")
    ap.add_argument("--out", type=Path, help="with --split: predictions (.parquet, .csv or .geojson); with "
                                             "images: the --format geojson or csv document (.geojson, .csv)")
    args = ap.parse_args(argv)
    if args.json and args.format not in (None, "json"):
        ap.error(f"--json and --format {args.format} disagree: give one")
    if args.albums is not None and (args.images or args.split or args.together):
        ap.error("--albums names its own images: give no images, --split or --together with it")
    if args.together and (args.split or not args.images):
        ap.error("--together answers the image files or folders given, once: give images, not --split")
    grouped = args.together or args.albums is not None
    if args.spread_km is not None and (not grouped or not args.spread_km >= 0):
        ap.error("--spread-km is a distance >= 0 for --together or --albums")
    if grouped and args.evidence:
        ap.error("--evidence shows the gallery images behind single answers: not with --together/--albums")
    if not args.images and not args.split and not grouped:
        ap.error("give image files or folders, or --split, or --albums")
    if grouped and args.out is not None and not args.json and args.format is None:
        args.format = IMAGE_OUT_FORMATS.get(args.out.suffix)
    if args.images and args.out is not None and not args.json and args.format is None:
        args.format = IMAGE_OUT_FORMATS.get(args.out.suffix)  # --out answers.geojson says the format
    fmt = "json" if args.json else (args.format or "text")
    if (args.images or grouped) and args.out is not None and fmt not in ("geojson", "csv"):
        ap.error(f"--out {args.out} with images writes a geojson or csv document: give --format geojson "
                 "or csv, or a file name ending in .geojson or .csv (text and --json go to the terminal)")
    if (args.images or grouped) and args.out is not None and args.out.suffix != f".{fmt}":
        ap.error(f"--out {args.out}: --format {fmt} is written to a file ending in .{fmt}")
    if args.evidence < 0:
        ap.error(f"--evidence must be 0 or more, got {args.evidence}")
    if args.top < 1:
        ap.error(f"--top must be at least 1 (the answer itself), got {args.top}")
    if args.out is not None and (args.out.is_dir() or args.out.suffix not in SPLIT_SUFFIXES):
        ap.error(f"--out {args.out}: give a file name ending in .parquet, .csv or .geojson")
    if args.split and str(args.index or "").startswith("hf-hub:"):
        ap.error("--split embeds the split into the engine's folder: not into a published engine in the hub "
                 "cache; answer images, or build the engine locally")
    if args.split and (args.within is not None or args.bbox is not None):
        ap.error("--within and --bbox apply to images, not to --split")
    try:
        region = parse_region(args.within, args.bbox)
    except RegionError as e:
        ap.error(str(e))
    if args.out is not None:
        try:  # before any work: a split's predictions take minutes to make, then could not be written
            check_writable(args.out)
        except OSError as e:
            print(f"error: --out {args.out}: cannot be written ({e.strerror or e})", file=sys.stderr)
            return 2
    try:
        layout, published = resolve_engine(args.index)
        engine = Engine(layout.require_index(), model=args.model or published)
        if engine.untuned_warning():
            print(engine.untuned_warning(), file=sys.stderr)
        if args.split:
            data = args.data or default_sample_root()
            out = args.out or layout.predictions(args.split)
            print(predict_split(engine, data, args.split, out))
            return 0
    except (EngineMissing, IndexError_, BackboneError, DataError, ConfigError, ShareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled up, a folder that went away meanwhile
        print(f"error: {printable(str(e.filename or ''))}: {e.strerror or e}", file=sys.stderr)
        return 2
    failed = 0
    if args.albums is not None:
        try:
            albums = read_albums(args.albums)
        except (OSError, ValueError) as e:
            print(f"error: --albums {printable(str(args.albums))}: {e}", file=sys.stderr)
            return 2
        paths = [p for _, album in albums for p in album]
    else:
        paths = expand(args.images)
        albums = [(None, paths)]
    if not paths:
        print("error: no images found in " + " ".join(args.images), file=sys.stderr)
        return 2
    try:
        if region:
            engine.region_rows(region)  # an empty region is one message, not one per image
    except RegionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    collected = []  # geojson and csv are one document: written once every image is answered
    if grouped:
        try:
            collected, failed = say_albums(engine, albums, args, fmt, region or None)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return finish(collected, fmt, args.out, failed)
    for path, answer, error in answers(engine, paths, tta=args.tta, region=region or None):
        if answer is not None and args.evidence:
            answer["evidence"] = [evidence(engine, n) for n in answer["neighbours"][:args.evidence]]
        if error:
            failed += 1
            print(f"error: {printable(str(path))}: {error}", file=sys.stderr)
        elif fmt == "json":
            print(json.dumps({k: v for k, v in answer.items() if k != "neighbours"}), flush=True)
        elif fmt == "text":
            print(human(answer, args.top), flush=True)
        else:
            collected.append(answer)
    return finish(collected, fmt, args.out, failed)


def say_albums(engine, albums: list, args, fmt: str, region) -> tuple[list, int]:
    """Answer the albums, printing text or JSON as they come: (answers for a document, photos failed)."""
    collected, failed = [], 0
    for name, answer, errors in album_answers(engine, albums, args.tta, region, args.spread_km):
        for path, error in errors:
            failed += 1
            where = f" (album {printable(name)})" if name else ""
            print(f"error: {printable(str(path))}: {error}{where}", file=sys.stderr)
        if answer is None:
            print(f"error: album {printable(name or '')}: no photo of it could be read", file=sys.stderr)
        elif fmt == "json":
            print(json.dumps(answer), flush=True)
        elif fmt == "text":
            print(human_album(answer), flush=True)
        else:
            collected.append(answer)
    return collected, failed


def finish(collected: list, fmt: str, out: Path | None, failed: int) -> int:
    """Write the geojson or csv document of the answers collected (to `out`, else stdout); the exit code."""
    if fmt in ("geojson", "csv"):
        from retrieve.formats import csv_text, geojson_text

        text = geojson_text(collected) + "\n" if fmt == "geojson" else csv_text(collected)
        if out is None:
            sys.stdout.write(text)
        else:
            try:
                write_text(out, text)
            except OSError as e:
                print(f"error: --out {out}: cannot be written ({e.strerror or e})", file=sys.stderr)
                return 2
            print(f"{len(collected)} answers -> {out}", file=sys.stderr)
    return 1 if failed else 0


def read_albums(path: Path) -> list[tuple[str, list[Path]]]:
    """[(album, [image paths])] of a CSV with columns album,image (paths relative to the CSV's folder),
    in order of each album's first row; ValueError naming what is wrong."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte order mark
        reader = csv.DictReader(f)
        missing = {"album", "image"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"needs the columns album and image (missing: {', '.join(sorted(missing))})")
        albums: dict[str, list[Path]] = {}
        for line, row in enumerate(reader, start=2):
            name, image = (row.get("album") or "").strip(), (row.get("image") or "").strip()
            if not name or not image:
                raise ValueError(f"line {line}: an album and an image are needed, got {name!r}, {image!r}")
            albums.setdefault(name, []).append(path.parent / image)
    if not albums:
        raise ValueError("no albums in it (only a header)")
    return list(albums.items())


def human_album(answer: dict) -> str:
    lat, lon = answer["latitude"], answer["longitude"]
    place, how_sure = _place(answer), _how_sure(answer, "support")
    title = f"album {answer['album']}" if "album" in answer else "together"
    lines = [f"{title} ({len(answer['images'])} photos): {lat:.5f}, {lon:.5f}  near {place}  ({how_sure}; "
             f"the most confident photo alone: {answer['best_single_within_200km']:.0%})",
             f"  map: {osm_link(lat, lon)}"]
    for photo in answer["photos"]:
        lines.append(f"    {photo['image']}: alone {photo['latitude']:.4f}, {photo['longitude']:.4f} "
                     f"({photo['confidence']:.0%}); agrees {photo['agreement']:.0%}")
    return "\n".join(lines)


IMAGE_OUT_FORMATS = {".geojson": "geojson", ".csv": "csv"}


def evidence(engine, neighbour: dict) -> dict:
    """A neighbour behind an answer with its file (`path`), or "" and a `note` saying why there is none
    (a photo linked in from outside the gallery folder, a file gone since the build)."""
    path, why = engine.gallery_lookup(neighbour["id"])
    return {**neighbour, "path": printable(str(path or ""))} | ({} if path else {"note": printable(why)})


def check_writable(out: Path) -> None:
    """OSError unless a file can be created at `out` (its folder made where missing): tried, not
    guessed, with the name the result is first written under, and removed again."""
    why = folder_problem(out.parent)
    if why:
        raise OSError(why)
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.with_name(out.name + ".partial")
    with open(probe, "wb"):
        pass
    probe.unlink()


def write_text(out: Path, text: str) -> None:
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
