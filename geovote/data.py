"""Read and validate a dataset in OSV-5M's layout.

    <root>/train.csv, <root>/val.csv (optional), <root>/test.csv
    <root>/images/<split>/**/<id>.jpg

The CSV is streamed with pyarrow, in blocks, keeping only the columns asked for: a 5M-row, 3 GB
`train.csv` never sits whole in memory, nor becomes Python objects. Ids are read as strings (OSV-5M's
are digits, which a type-guessing reader would turn into integers), and only "", "NaN" and "nan" mean
missing: pandas' default reads Namibia's country code "NA" as missing, an upstream bug.

Every row that cannot be used is counted, written to a rejects CSV with its reason (when the caller names
one: rejects belong with the caller's outputs, never in the dataset), and reported in one summary line;
none is dropped silently. A file that cannot be read as one comma-separated UTF-8 row per line (an
unbalanced quote that swallows the lines after it, another encoding, gzip, semicolons) is refused with a
DataError that names the file, the line and what would work. The first failing check names the reason,
in this order:
malformed line, missing id, non-numeric or NaN coordinates, latitude outside [-90, 90], longitude outside
[-180, 180], duplicate id (the first occurrence is kept), image file missing.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geovote import csvsafe
import pyarrow.csv as pacsv

ID, LAT, LON = "id", "latitude", "longitude"
REQUIRED_COLUMNS = (ID, LAT, LON)
NULL_VALUES = ["", "NaN", "nan"]  # not "NA": that is Namibia
# pyarrow parses blocks of this size, several ahead on its threads: memory is bounded by it, not the
# file. Smaller blocks hold less in flight and were no slower (python -m benchmark.csv_read).
CSV_BLOCK_BYTES = 1 << 20
IMAGE_SUFFIX = ".jpg"

# Column types where guessing goes wrong: ids and place keys are strings ("NA", digit-only ids).
_KNOWN_TYPES: dict[str, pa.DataType] = {
    ID: pa.string(),
    LAT: pa.string(),  # parsed to float by us, so that one bad value rejects a row, not the file
    LON: pa.string(),
    "country": pa.string(), "region": pa.string(), "sub-region": pa.string(), "city": pa.string(),
    "unique_country": pa.string(), "unique_region": pa.string(),
    "unique_sub-region": pa.string(), "unique_city": pa.string(),
    "sequence": pa.string(), "creator_username": pa.string(), "creator_id": pa.string(),
}

REJECT_REASONS = (
    "malformed line", "missing id", "coordinates not numbers", "NaN coordinates",
    "latitude outside [-90, 90]", "longitude outside [-180, 180]", "duplicate id", "image missing",
)


class DataError(Exception):
    """A dataset that cannot be read at all (missing file or column). Rows are rejected, not raised."""


@dataclass
class Report:
    """What reading one split found."""

    csv_path: Path
    rows: int = 0  # data lines in the file, malformed ones included
    valid: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> rows
    rejects_path: Path | None = None

    def summary(self) -> str:
        n_bad = sum(self.rejected.values())
        line = f"{self.csv_path}: {self.rows:,} rows, {self.valid:,} valid, {n_bad:,} rejected"
        if n_bad:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in self.rejected.most_common())
            line += f" ({parts})"
            if self.rejects_path:
                line += f"; rejects written to {self.rejects_path}"
        return line


class ImagePaths:
    """The image path of each row, as a sequence: one Arrow string array, a Path made only when asked for.
    A list of millions of Path objects is one Python object each, and every forked DataLoader worker touches
    their reference counts, copying the pages they sit on."""

    def __init__(self, root: Path, relative: pa.Array):
        self.root, self.relative = Path(root), relative

    def __len__(self) -> int:
        return len(self.relative)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.root / p for p in self.relative[i].to_pylist()]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return self.root / self.relative[i].as_py()

    def __iter__(self):
        for batch in range(0, len(self), 65536):
            yield from self[batch:batch + 65536]


@dataclass
class Split:
    """The valid rows of one split: an Arrow table with `id`, `latitude`, `longitude` (float64),
    `path` (image path relative to the dataset root, when images were checked) and any extra columns."""

    root: Path
    name: str
    table: pa.Table
    report: Report
    images: str = "dataset"  # `path` under: "dataset" <root>/images/<split>/, "photos" or "shards" <root>/

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> np.ndarray:
        return self.table.column(ID).to_numpy(zero_copy_only=False)

    @property
    def lat_deg(self) -> np.ndarray:
        return self.table.column(LAT).to_numpy()

    @property
    def lon_deg(self) -> np.ndarray:
        return self.table.column(LON).to_numpy()

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def text_column(self, name: str) -> np.ndarray:
        """A column as text, "" where the CSV cell was blank (read as null): never the word "None"."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = pc.fill_null(pc.cast(self.table.column(name), pa.string()), "")
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)

    def image_paths(self) -> "ImagePaths":
        return ImagePaths(self.root, self.table.column("path").combine_chunks())

    def require_rows(self) -> "Split":
        """This split, or a DataError saying why no row survived and where images are looked for."""
        if len(self):
            return self
        rep = self.report
        reasons = ", ".join(f"{n:,} {r}" for r, n in rep.rejected.most_common(3))
        message = f"{rep.csv_path}: 0 usable rows of {rep.rows:,}" + (f" ({reasons})" if reasons else
                                                                       ": the file has a header only")
        if rep.rejected.get("image missing") and self.images == "shards":
            message += f"; images are expected as <key>.jpg members of the shards in {self.root}"
        elif rep.rejected.get("image missing"):
            from geovote.webshards import shard_files

            if shard_files(self.root):
                message += (f"; {self.root} also holds webdataset shards, read only where there is no "
                            f"{self.name}.csv")
            base = self.root / "images" / self.name
            message += f"; images are expected at {base}/**/<id>{IMAGE_SUFFIX}"
            if not base.is_dir():
                parent = base.parent
                there = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
                message += f", and {base} does not exist" + (f" (images/ holds: {', '.join(there)})" if there
                                                           else "")
        if rep.rejects_path:
            message += f"; every row's reason is in {rep.rejects_path}"
        raise DataError(message)


def split_csv(root: str | os.PathLike, split: str) -> Path:
    path = Path(root) / f"{split}.csv"
    if not path.is_file():
        have = sorted(p.name for p in Path(root).glob("*.csv")) if Path(root).is_dir() else []
        raise DataError(f"no {split}.csv in {root} (found: {', '.join(have) or 'nothing'})")
    return path


def _encoding_problem(csv_path: Path) -> str | None:
    """Why the file's first bytes show it is not a plain UTF-8 CSV, or None."""
    with open(csv_path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "is gzip-compressed: decompress it first (gunzip)"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "is UTF-16 text: save it as UTF-8"
    if head[:4] == b"PK\x03\x04":
        return "is a zip archive (a spreadsheet?): export it as CSV (UTF-8)"
    return None


def csv_columns(csv_path: Path) -> list[str]:
    """The header of a CSV file (a UTF-8 byte-order mark, as spreadsheet programs write, is skipped)."""
    if not Path(csv_path).is_file():
        raise DataError(f"no such CSV file: {csv_path}")
    problem = _encoding_problem(Path(csv_path))
    if problem:
        raise DataError(f"{csv_path} {problem}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} near byte "
                        f"{e.start} of the file): save it as UTF-8") from None
    if not header:
        raise DataError(f"{csv_path} is empty: expected a header with {', '.join(REQUIRED_COLUMNS)}")
    if len(header) == 1 and ";" in header[0] and ID in header[0].split(";"):
        raise DataError(f"{csv_path} is separated by semicolons; geovote reads comma-separated files: "
                        "export it again with commas")
    if len(header) == 1 and "\t" in header[0]:
        raise DataError(f"{csv_path} is separated by tabs; geovote reads comma-separated files")
    return header


def count_rows(csv_path: Path, block_bytes: int = 1 << 24) -> int:
    """Non-empty lines after the header: what the file holds if every row sits on one line. Counted
    with bytes.count and numpy over blocks (a 3 GB file in a few seconds, no Python per line)."""
    n_newlines = n_empty = 0
    prev = b"\n"  # a virtual line end before the file: a leading empty line counts as empty
    last = b""
    with open(csv_path, "rb") as f:
        while block := f.read(block_bytes):
            n_newlines += block.count(b"\n")
            a = np.frombuffer(prev + block, np.uint8)
            nl = a == 10
            p = len(prev)  # an empty line is counted where its closing "\n" is: in this block, once
            n_empty += int(np.count_nonzero((nl[:-1] & nl[1:])[p - 1:]))  # "\n\n"
            if len(a) >= 3:
                crlf = nl[:-2] & (a[1:-1] == 13) & nl[2:]  # "\n\r\n"
                n_empty += int(np.count_nonzero(crlf[max(0, p - 2):]))
            prev, last = (prev + block)[-2:], block
    if not last:
        return 0
    n_lines = n_newlines + (0 if last.endswith(b"\n") else 1)
    return max(0, n_lines - n_empty - 1)  # minus the header


def _spanning_row(csv_path: Path) -> str:
    """Where a quoted value first spans several lines (usually an unbalanced quote), for the message."""
    limit = csv.field_size_limit(2**31 - 1)  # an unbalanced quote makes one field of the rest of the file
    try:
        with open(csv_path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            line = 1
            for _ in reader:
                start, line = line, reader.line_num + 1
                if reader.line_num > start:
                    return (f"the row starting on line {start} runs to line {reader.line_num} (an unbalanced "
                            "'\"' in it quotes the lines after it)")
    finally:
        csv.field_size_limit(limit)
    return "some rows span several lines (quoted line breaks)"


def _multiline_error(csv_path: Path, n_rows: int, n_lines: int) -> DataError:
    return DataError(f"{csv_path}: {n_lines:,} rows on their lines but {n_rows:,} read: "
                     f"{_spanning_row(csv_path)}; fix the quoting there (geovote reads one row per line)")


def iter_csv_batches(
    csv_path: Path, columns: Sequence[str], on_malformed=None, block_bytes: int = CSV_BLOCK_BYTES
) -> Iterator[pa.RecordBatch]:
    """Stream `columns` of a CSV as record batches. Missing columns raise DataError before reading.

    `on_malformed(text)` is called for each line with the wrong number of fields (then skipped).
    """
    header = csv_columns(csv_path)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{csv_path} lacks column(s) {', '.join(missing)}; it has: {', '.join(header)}"
        )

    def handler(row) -> str:
        if on_malformed is not None:
            on_malformed(row.text)
        return "skip"

    try:
        # opening reads (and converts) the first block already: its errors are the same as later ones'
        reader = pacsv.open_csv(
            csv_path,
            read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=True),
            parse_options=pacsv.ParseOptions(invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns),
                column_types={c: t for c, t in _KNOWN_TYPES.items() if c in columns},
                null_values=NULL_VALUES,
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        for batch in reader:
            yield batch
    except pa.ArrowInvalid as e:
        message = str(e)
        if "Empty CSV file" in message:  # a header with no line end: no rows
            return
        if "invalid UTF8" in message:
            raise DataError(f"{csv_path} is not UTF-8 text ({message.splitlines()[0]}): "
                            "save it as UTF-8") from None
        if "out of sync" in message or "quote" in message.lower():
            raise DataError(f"{csv_path}: {_spanning_row(csv_path)}; fix the quoting there "
                            "(geovote reads one row per line)") from None
        raise DataError(f"{csv_path}: unreadable as CSV ({message.splitlines()[0]})") from None


def _to_float(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> float64, and a mask of values that were present but not numbers (NaN there)."""
    try:
        return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), np.zeros(len(values), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # a bad value somewhere in the block: parse it value by value (rare)
    out = np.full(len(values), np.nan)
    bad = np.zeros(len(values), bool)
    for i, v in enumerate(values.to_pylist()):
        if v is None:
            continue
        try:
            out[i] = float(v)
        except ValueError:
            bad[i] = True
    return out, bad


def index_images(root: str | os.PathLike, split: str, log=None) -> pa.Table:
    """Every `<id>.jpg` under `<root>/images/<split>/` as a table (`id`, `path` relative to root): the
    files, then the members of the `.zip` (and `.tar`) archives there (OSV-5M as it ships: read in
    place, never extracted, geovote.archives; any member layout, found by the file name), an id already
    extracted keeping its file. An archive whose listing cannot be read (truncated) is skipped, and said
    so through `log`."""
    from geovote.archives import ARCHIVE_SEP, ArchiveError, is_archive, list_members

    base = Path(root) / "images" / split
    ids: list[str] = []
    paths: list[str] = []
    archives: list[str] = []
    if base.is_dir():
        stack = [base]
        while stack:  # os.scandir: one stat-free pass, far faster than Path.rglob on millions of files
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.name.endswith(IMAGE_SUFFIX):
                        ids.append(entry.name[: -len(IMAGE_SUFFIX)])
                        paths.append(os.path.relpath(entry.path, root))
                    elif is_archive(entry.name):
                        archives.append(entry.path)
    extracted = set(ids)
    for archive in sorted(archives):
        try:
            members = list_members(archive, log)
        except ArchiveError as e:
            if log:
                log(f"{archive}: {e}: its images are missing")
            continue
        rel = os.path.relpath(archive, root)
        for name, _ in members:
            image = name.rsplit("/", 1)[-1]
            if image.endswith(IMAGE_SUFFIX) and image[: -len(IMAGE_SUFFIX)] not in extracted:
                ids.append(image[: -len(IMAGE_SUFFIX)])
                paths.append(f"{rel}{ARCHIVE_SEP}{name}")
    return pa.table({ID: pa.array(ids, pa.string()), "path": pa.array(paths, pa.string())})


class Rejects:
    """Writes rejected rows as they are found, so that a large bad file costs no memory."""

    def __init__(self, path: Path | None, report: Report):
        self.path, self.report, self._file, self._writer = path, report, None, None

    def add(self, reason: str, ids: Sequence, rows: Sequence, text: Sequence | None = None) -> None:
        if len(ids) == 0:
            return
        self.report.rejected[reason] += len(ids)
        if self.path is None:
            return
        if self._writer is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", newline="", encoding="utf-8")
            except OSError as e:
                raise DataError(f"cannot write the rejects file {self.path} ({e}); "
                                "pass another rejects path") from None
            self._writer = csv.writer(self._file)
            self._writer.writerow(["row", ID, "reason", "text"])
            self.report.rejects_path = self.path
        text = text if text is not None else [""] * len(ids)
        for r, i, t in zip(rows, ids, text):
            self._writer.writerow(csvsafe.row([r, i, reason, t]))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_split(
    root: str | os.PathLike,
    split: str,
    columns: Sequence[str] = (),
    check_images: bool = True,
    rejects_path: str | os.PathLike | None = None,
) -> Split:
    """Read, validate and return the valid rows of `<root>/<split>.csv`; for a folder of webdataset
    shards (img2dataset's output, geovote.webshards) without that CSV, its samples as the train split.

    `columns`: extra CSV columns to keep (e.g. `unique_country`). `rejects_path`: where to write the
    rejected rows (none written without it: the report still counts them); `row` there is the 0-based
    data row (-1 for malformed lines, whose text is kept instead).
    """
    root = Path(root)
    if not (root / f"{split}.csv").is_file() and is_shard_folder(root):
        return _read_shards(root, split, columns, rejects_path)
    table, report = read_table(
        split_csv(root, split), columns,
        rejects_path=Path(rejects_path) if rejects_path else None,
        images=index_images(root, split, log=lambda m: print(f"warning: {m}", file=sys.stderr))
        if check_images else None,
    )
    return Split(root, split, table, report)


def is_shard_folder(root: str | os.PathLike) -> bool:
    """A folder of webdataset shards (img2dataset's output), read as the train split where it has no
    train.csv. Compressed shards are refused: they cannot be read in place."""
    from geovote import webshards

    root = Path(root)
    if webshards.shard_files(root):
        return True
    packed = sorted(p.name for p in [*root.glob("*.tar.gz"), *root.glob("*.tgz")]) if root.is_dir() else []
    if packed:
        raise DataError(f"{root} holds gzip-compressed webdataset shards ({packed[0]}, ...): decompress them "
                        "(gunzip; shards are read in place, which needs an uncompressed .tar)")
    return False


def _read_shards(root: Path, split: str, columns: Sequence[str], rejects_path) -> Split:
    """The samples of a folder of webdataset shards as the train split, checked as a CSV's rows are;
    `size` and `mtime_ns` (the image member's bytes and its shard's modification time) make a shard
    downloaded again be embedded again (embed.split.row_fingerprints)."""
    from geovote import webshards

    if split != webshards.SPLIT:
        raise DataError(f"{root} is a folder of webdataset shards: one gallery, read as the "
                        f"{webshards.SPLIT} split; it has no {split} split (no {split}.csv)")
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *columns]))
    try:
        scan = webshards.scan_shards(root, wanted[1:], log=lambda m: print(f"warning: {m}", file=sys.stderr))
    except webshards.WebShardError as e:
        raise DataError(str(e)) from None
    report = Report(root / f"({scan.shards} webdataset shard{'s' * (scan.shards != 1)})")
    rejects = Rejects(Path(rejects_path) if rejects_path else None, report)
    try:
        for reason in dict.fromkeys(r[0] for r in scan.rejected):
            _, keys, rows, texts = zip(*(r for r in scan.rejected if r[0] == reason))
            rejects.add(reason, keys, rows, texts)
        meta = scan.meta.rename_columns([ID if c == webshards.ID else c for c in scan.meta.column_names])
        table = checked_rows(meta, wanted, meta.column("_row").to_numpy(), rejects)
        table = drop_duplicate_ids(table, rejects)
        table = attach_images(table, scan.images.rename_columns([ID, "path", "size", "mtime_ns"]), rejects)
    finally:
        rejects.close()
    report.rows, report.valid = scan.records, table.num_rows
    return Split(root, webshards.SPLIT, table.drop_columns(["_row"]), report, images="shards")


def read_table(
    csv_path: Path,
    columns: Sequence[str] = (),
    rejects_path: Path | None = None,
    images: pa.Table | None = None,
) -> tuple[pa.Table, Report]:
    """The valid rows of one CSV file and the report. Rejected rows are counted in the report, and
    written to `rejects_path` when given. With `images` (from `index_images`), rows without an image
    are rejected and the others get a `path` column."""
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *columns]))
    report = Report(Path(csv_path))
    rejects = Rejects(rejects_path, report)
    malformed: list[str] = []
    batches: list[pa.Table] = []
    row0 = 0
    try:
        for batch in iter_csv_batches(csv_path, wanted, on_malformed=malformed.append):
            batches.append(checked_rows(batch, wanted, np.arange(row0, row0 + batch.num_rows), rejects))
            row0 += batch.num_rows
        if malformed:
            rejects.add("malformed line", [None] * len(malformed), [-1] * len(malformed), malformed)
        n_lines = count_rows(Path(csv_path))
        if row0 + len(malformed) < n_lines:  # quoted line breaks: rows were swallowed, not rejected
            raise _multiline_error(Path(csv_path), row0 + len(malformed), n_lines)

        table = pa.concat_tables(batches) if batches else _empty_table(wanted)
        table = drop_duplicate_ids(table, rejects)
        if images is not None:
            table = attach_images(table, images, rejects)
    finally:
        rejects.close()
    report.rows = row0 + len(malformed)
    report.valid = table.num_rows
    return table.drop_columns(["_row"]), report


def checked_rows(batch, columns: Sequence[str], rows: np.ndarray, rejects: "Rejects") -> pa.Table:
    """The rows of `batch` (a record batch or table with `columns`, coordinates as text or numbers) that
    pass the row checks, as a table with float64 coordinates and `_row` (`rows`: their row numbers);
    the others go to `rejects` with the first check they fail."""
    ids = batch.column(ID)
    lat, lat_bad = _to_float(batch.column(LAT))
    lon, lon_bad = _to_float(batch.column(LON))
    has_id = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(ids)), 0)
    no_id = ~pc.fill_null(has_id, False).to_numpy(zero_copy_only=False)
    checks = [
        ("missing id", no_id),
        ("coordinates not numbers", lat_bad | lon_bad),
        ("NaN coordinates", np.isnan(lat) | np.isnan(lon)),
        ("latitude outside [-90, 90]", np.abs(lat) > 90),
        ("longitude outside [-180, 180]", np.abs(lon) > 180),
    ]
    ok = np.ones(batch.num_rows, bool)
    for reason, bad in checks:
        hit = bad & ok
        if hit.any():
            rejects.add(reason, ids.filter(pa.array(hit)).to_pylist(), rows[hit])
            ok &= ~hit
    cols = {
        ID: ids, LAT: pa.array(lat), LON: pa.array(lon), "_row": pa.array(rows),
        **{c: batch.column(c) for c in columns if c not in REQUIRED_COLUMNS},
    }
    table = pa.table(cols)
    return table if ok.all() else table.filter(pa.array(ok))


def _empty_table(columns: Sequence[str]) -> pa.Table:
    types = {LAT: pa.float64(), LON: pa.float64(), "_row": pa.int64()}
    return pa.table({c: pa.array([], types.get(c, pa.string())) for c in [*columns, "_row"]})


def drop_duplicate_ids(table: pa.Table, rejects: Rejects) -> pa.Table:
    """Keep the first row of each id; reject the others.

    By a stable sort rather than a hash table: on 5M ids, dictionary encoding peaked at ~850 MiB
    more, the sort at a fraction of that.
    """
    if table.num_rows < 2:
        return table
    order = pc.sort_indices(table.column(ID))  # stable: equal ids stay in row order
    ids = table.column(ID).take(order).combine_chunks()
    n = len(ids)
    same = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    del ids
    if not same.any():
        return table
    dup_rows = order.to_numpy()[np.flatnonzero(same) + 1]
    keep = np.ones(table.num_rows, bool)
    keep[dup_rows] = False
    dup = table.filter(pa.array(~keep))
    rejects.add("duplicate id", dup.column(ID).to_pylist(), dup.column("_row").to_pylist())
    return table.filter(pa.array(keep))


def attach_images(table: pa.Table, images: pa.Table, rejects: Rejects) -> pa.Table:
    """Add each row's image path (and whatever else `images` has beside `id`: a shard's member size and
    time); reject rows whose image is not on disk."""
    # index_in gives null where an id has no image file
    pos = pc.fill_null(pc.index_in(table.column(ID), value_set=images.column(ID)), -1).to_numpy()
    found = pos >= 0
    if not found.all():
        gone = table.filter(pa.array(~found))
        rejects.add("image missing", gone.column(ID).to_pylist(), gone.column("_row").to_pylist())
        table = table.filter(pa.array(found))
        pos = pos[found]
    at = pa.array(pos, pa.int64())
    for name in images.column_names:
        if name != ID:
            table = table.append_column(name, images.column(name).take(at))
    return table
