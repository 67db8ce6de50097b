"""The holes an outside tester found (issue 25), each through the real command or a live server: GPS
references, files that stop or hang a gallery build, coordinate CSV rows, walk errors, spreadsheet
formulas in CSV outputs, `--out` for image answers, unwritable outputs, and links out of the gallery.
Concurrent builds and stale caches are in test_concurrency.py; the server's holes in test_serve_holes.py."""
import contextlib
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from embed.build import main as embed_main
from retrieve.query import main as query_main


def run(main, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command run in-process; an escaping exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return rc, out.getvalue(), err.getvalue()


def _dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 4)


def _save(path, src, gps: dict | None, fmt: str = "JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if gps is not None:
        exif[0x8825] = gps
    with Image.open(src) as im:
        im.save(path, fmt, exif=exif)


def _gps(lat, lon, lat_ref=None, lon_ref=None) -> dict:
    return {1: lat_ref or ("N" if lat >= 0 else "S"), 2: _dms(lat),
            3: lon_ref or ("E" if lon >= 0 else "W"), 4: _dms(lon)}


def _bomb_png(path: Path, side: int = 30_000) -> None:
    """A PNG whose header claims side x side pixels (a few hundred bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _deep_photo(root: Path, src: Path, depth: int = 18) -> None:
    """A photo under a path longer than PATH_MAX (4,096 bytes), made step by step with folder fds."""
    name = "d" * 250
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    out = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, src.read_bytes())
    os.close(out)
    os.close(fd)


@pytest.fixture(scope="module")
def hostile(sample_root, tmp_path_factory):
    """A gallery folder of 24 good photos (some nested, .jfif and .jpe among them) and every bad file of
    the issue: GPS references that are not N/S/E/W, a decompression bomb, a non-UTF-8 name, a FIFO, a
    folder too deep to list, a formula for a name, a link to a photo outside, and a coordinates CSV with
    a byte order mark, a Windows path, a decimal comma and a row for no photo."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "gallery"
    with open(sample_root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:40]
    src = {r["id"]: next((sample_root / "images" / "train").rglob(f"{r['id']}.jpg")) for r in rows}
    good = {}
    kinds = {1: (".jfif", "JPEG"), 2: (".jpe", "JPEG"), 3: (".png", "PNG"), 4: (".tif", "TIFF")}
    for i, r in enumerate(rows[:24]):
        suffix, fmt = kinds.get(i, (".jpg", "JPEG"))
        rel = f"{2024 + i % 2}/{i % 3:02d}/p{i:05d}{suffix}"
        lat, lon = float(r["latitude"]), float(r["longitude"])
        _save(root / rel, src[r["id"]], _gps(lat, lon) if fmt != "TIFF" else None, fmt)  # TIFF: by the CSV
        good[rel] = (lat, lon)
    spare = [src[r["id"]] for r in rows[24:]]
    lat, lon = 48.85, 2.35
    _save(root / "refs" / "south_west_words.jpg", spare[0], _gps(lat, lon, "South", "West"))
    _save(root / "refs" / "no_refs.jpg", spare[1], {2: _dms(lat), 4: _dms(lon)})
    _save(root / "refs" / "x_ref.jpg", spare[2], _gps(lat, lon, "X"))
    _save(root / "refs" / "w_for_latitude.jpg", spare[3], _gps(lat, lon, "W"))
    _save(root / "refs" / "short_ref.jpg", spare[4], _gps(lat, lon, 83))
    _save(root / "refs" / "lower_padded.jpg", spare[5], _gps(33.86, 151.21, " s", "e "))  # accepted: -33.86
    good["refs/lower_padded.jpg"] = (-33.86, 151.21)
    _bomb_png(root / "panorama.png")
    _save(Path(os.fsdecode(bytes(root) + b"/caf\xe9.jpg")), spare[6], _gps(lat, lon))
    os.mkfifo(root / "fifo.jpg")
    _deep_photo(root, spare[7])
    _save(root / "=1+2;@SUM(A1).jpg", spare[8], None)
    outside = base / "elsewhere" / "linked.jpg"
    _save(outside, spare[9], _gps(-22.9, -43.2))
    (root / "linked.jpg").symlink_to(outside)
    good["linked.jpg"] = (-22.9, -43.2)
    _save(root / "sub" / "from_csv.jpg", spare[10], None)
    _save(root / "sub" / "comma.jpg", spare[11], None)
    good["sub/from_csv.jpg"] = (-33.5, 151.0)
    tif = next(rel for rel in good if rel.endswith(".tif"))
    (base / "coords.csv").write_text("\ufeffpath,latitude,longitude\nsub\\from_csv.jpg,-33.5,151.0\n"
                                     'sub/comma.jpg,"48,85","2,35"\nghost.jpg,10,10\n'
                                     f"{tif},{good[tif][0]!r},{good[tif][1]!r}\n", encoding="utf-8")
    return root, base / "coords.csv", good


@pytest.fixture(scope="module")
def hostile_engine(hostile, tiny_model, tmp_path_factory):
    root, coords, _ = hostile
    out = tmp_path_factory.mktemp("hostile-engine")
    rc, stdout, stderr = run(embed_main, ["--photos", root, "--photos-csv", coords, "--model", tiny_model,
                                          "--out", out, "--workers", "0", "--set", "tune=false"])
    return rc, stdout, stderr, out


def test_a_hostile_gallery_builds_and_every_bad_file_is_a_reject_with_its_reason(hostile, hostile_engine):
    root, _, good = hostile
    rc, stdout, stderr, out = hostile_engine
    assert rc == 0, stderr
    with open(out / "rejects-photos.csv", newline="", encoding="utf-8") as f:
        rejects = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    deep = next(p for p in rejects if p.endswith("/"))
    assert deep.startswith("d" * 250) and rejects.pop(deep).startswith("folder could not be read")
    expected = {
        "refs/south_west_words.jpg": "latitude reference 'South' in its EXIF GPS is not N or S",
        "refs/no_refs.jpg": "no latitude reference (N/S) in its EXIF GPS",
        "refs/x_ref.jpg": "latitude reference 'X' in its EXIF GPS is not N or S",
        "refs/w_for_latitude.jpg": "latitude reference 'W' in its EXIF GPS is not N or S",
        "refs/short_ref.jpg": "latitude reference '83' in its EXIF GPS is not N or S",
        "panorama.png": None,  # "too large to open (...)", checked below
        "caf\\xe9.jpg": "file name is not valid UTF-8: rename it",
        "fifo.jpg": "not a regular file (a FIFO, socket or device): skipped unopened",
        "'=1+2;@SUM(A1).jpg": "no GPS coordinates in its EXIF",  # a formula made text (csvsafe)
        "sub/comma.jpg": "latitude is not a number in coords.csv ('48,85': a decimal comma? write 48.85, "
                         "not 48,85)",
        "ghost.jpg": "named in coords.csv, but no photo of the folder has this path",
    }
    assert set(rejects) == set(expected), rejects
    for path, reason in expected.items():
        assert reason is None or rejects[path] == reason, (path, rejects[path])
    assert rejects["panorama.png"].startswith("too large to open")
    # every photo that was there is counted: the good ones, the rejected files (not the CSV's ghost row)
    n_files = len(good) + len(expected) - 1
    assert f"{n_files} photos, {len(good)} with coordinates" in stdout, stdout
    assert "1 folder could not be read" in stdout

    from geovote.shards import read_embeddings

    emb = read_embeddings(out / "embeddings" / "train")
    got = dict(zip(emb.ids.astype(str), zip(emb.lat_deg, emb.lon_deg)))
    assert set(got) == set(good)
    for rel, (lat, lon) in good.items():
        assert got[rel] == pytest.approx((lat, lon), abs=1e-6), rel


def test_evidence_from_a_linked_photo_says_it_lies_outside_and_csv_cells_are_safe(hostile, hostile_engine,
                                                                                 tmp_path, monkeypatch):
    root, _, _ = hostile
    *_, out = hostile_engine
    monkeypatch.chdir(tmp_path)
    query = Path("=HYPERLINK(1).jpg")  # a query photo named like a formula, given as a relative path
    shutil.copy(root / "linked.jpg", query)
    rc, stdout, stderr = run(query_main, [query, "--index", out / "index", "--json", "--evidence", "1"])
    assert rc == 0, stderr
    ev = json.loads(stdout)["evidence"][0]
    assert ev["id"] == "linked.jpg" and ev["path"] == ""  # its own photo, by the link in the gallery
    assert "link to a file outside the gallery folder" in ev["note"]

    nested = root / "2024" / "00" / "p00000.jpg"
    rc, stdout, stderr = run(query_main, [query, nested, "--index", out / "index", "--format", "csv",
                                          "--evidence", "3"])
    assert rc == 0, stderr
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert rows[0]["image"] == "'" + str(query)  # not a formula when the table is opened
    assert rows[0]["image"].lstrip("'") == str(query)
    ids = [e["id"] for e in json.loads(rows[1]["evidence"])]  # one JSON cell, split back exactly
    assert ids[0] == "2024/00/p00000.jpg" and len(ids) == 3
    numbers = [r[c] for r in rows for c in ("latitude", "longitude", "confidence")]
    assert any(n.startswith("-") for n in numbers)  # a negative coordinate is there, left a number
    assert all(float(n) == float(n) for n in numbers)


def test_a_non_utf8_query_name_gives_valid_json(hostile, hostile_engine, tmp_path):
    root, _, _ = hostile
    *_, out = hostile_engine
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/vue-\xff.jpg"))
    shutil.copy(root / "2024" / "00" / "p00000.jpg", odd)
    proc = subprocess.run(
        [sys.executable, "-m", "retrieve.query", os.fsencode(odd), "--index", str(out / "index"), "--json"],
        capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    answer = json.loads(proc.stdout.decode("utf-8"))  # strict UTF-8: no lone surrogate inside
    assert answer["image"].endswith("vue-\\xff.jpg")
    answer["image"].encode("utf-8")


def test_geojson_and_csv_answers_go_to_out(hostile, hostile_engine, tmp_path):
    root, _, _ = hostile
    *_, out = hostile_engine
    img = root / "2024" / "00" / "p00000.jpg"
    rc, stdout, stderr = run(query_main, [img, "--index", out / "index", "--format", "geojson", "--out",
                                          tmp_path / "a.geojson"])
    assert rc == 0 and stdout == "", stderr
    doc = json.loads((tmp_path / "a.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"][0]["properties"]["image"] == str(img)
    rc, stdout, _ = run(query_main, [img, "--index", out / "index", "--out", tmp_path / "b.csv"])
    assert rc == 0 and stdout == ""  # the suffix says the format
    assert next(csv.DictReader(open(tmp_path / "b.csv")))["image"] == str(img)
    rc, _, stderr = run(query_main, [img, "--index", out / "index", "--json", "--out", tmp_path / "c.json"])
    assert rc == 2 and "writes a geojson or csv document" in stderr and not (tmp_path / "c.json").exists()


def test_unwritable_outputs_are_refused_before_the_work(hostile, hostile_engine, sample_root, tmp_path):
    root, _, _ = hostile
    *_, out = hostile_engine
    a_file = tmp_path / "FILE"
    a_file.write_text("x")
    rc, _, stderr = run(embed_main, ["--photos", root, "--out", a_file, "--model", "pixels:4"])
    assert rc == 2 and "FILE is a file, not a folder" in stderr
    assert a_file.read_text() == "x"
    rc, _, stderr = run(query_main, ["--split", "val", "--data", sample_root, "--index", out / "index",
                                     "--out", a_file / "x.csv"])
    assert rc == 2 and "is a file, not a folder" in stderr
    assert not (out / "embeddings" / "val").exists()  # refused before embedding the split
    rc, _, stderr = run(query_main, ["--split", "val", "--data", sample_root, "--index", out / "index",
                                     "--out", "/proc/x.csv"])
    assert rc == 2 and "/proc/x.csv: cannot be written" in stderr
    assert not (out / "embeddings" / "val").exists()


def test_a_failed_photo_is_named_with_the_file_that_lists_it(sample_root, tiny_model, tmp_path):
    """A photo whose EXIF reads but whose pixels do not decode fails at embedding: the summary says so
    and where it is listed (embeddings/train/failures.csv, as the README says)."""
    root = tmp_path / "g"
    srcs = sorted((sample_root / "images" / "train").rglob("*.jpg"))[:6]
    for i, src in enumerate(srcs):
        _save(root / f"p{i}.jpg", src, _gps(10 + i, 20 + i))
    data = (root / "p0.jpg").read_bytes()
    (root / "p0.jpg").write_bytes(data[:len(data) * 3 // 4])  # truncated: its header and EXIF still read
    rc, stdout, stderr = run(embed_main, ["--photos", root, "--model", tiny_model, "--out", tmp_path / "e",
                                          "--workers", "0", "--set", "tune=false"])
    assert rc == 0, stderr
    listed = tmp_path / "e" / "embeddings" / "train" / "failures.csv"
    assert f"1 failed (1 unreadable), listed in {listed}" in stdout, stdout
    assert next(csv.DictReader(open(listed)))["id"] == "p0.jpg"


def test_pillow_warnings_do_not_reach_the_build_output(sample_root, tiny_model, tmp_path):
    """A photo whose EXIF has a tag larger than the file: Pillow warns while reading it; the build says
    nothing of it (run as a user runs it, in its own process, every warning shown)."""
    root = tmp_path / "g"
    srcs = sorted((sample_root / "images" / "train").rglob("*.jpg"))[:4]
    for i, src in enumerate(srcs):
        _save(root / f"p{i}.jpg", src, _gps(10 + i, 20 + i))
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 5000, 26)
            + struct.pack("<I", 0))  # ImageDescription: 5,000 bytes said, none there
    with Image.open(srcs[0]) as im:
        im.save(root / "odd_exif.jpg", "JPEG", exif=b"Exif\x00\x00" + tiff)
    (tmp_path / "coords.csv").write_text("path,latitude,longitude\nodd_exif.jpg,40.0,-3.0\n")
    r = subprocess.run([sys.executable, "-W", "always", "-m", "embed.build", "--photos", str(root), "--photos-csv",
                        str(tmp_path / "coords.csv"), "--model", str(tiny_model), "--out", str(tmp_path / "e"),
                        "--workers", "0", "--set", "tune=false"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "5 photos, 5 with coordinates" in r.stdout
    assert "Warning" not in r.stderr and "Tag data" not in r.stderr, r.stderr[-2000:]


def test_an_empty_gallery_rewrites_its_rejects_file(sample_root, tmp_path):
    root = tmp_path / "g"
    srcs = sorted((sample_root / "images" / "train").rglob("*.jpg"))[:2]
    _save(root / "a.jpg", srcs[0], _gps(10, 20))
    _save(root / "b.jpg", srcs[1], None)
    out = tmp_path / "e"
    assert run(embed_main, ["--photos", root, "--model", "pixels:4", "--out", out, "--set", "tune=false",
                            "--workers", "0"])[0] == 0
    _save(root / "a.jpg", srcs[0], None)  # every photo lost its GPS
    rc, stdout, stderr = run(embed_main, ["--photos", root, "--model", "pixels:4", "--out", out,
                                          "--workers", "0"])
    assert rc == 2 and f"listed in {out / 'rejects-photos.csv'}" in stdout
    with open(out / "rejects-photos.csv", newline="") as f:
        assert {r["path"] for r in csv.DictReader(f)} == {"a.jpg", "b.jpg"}  # rewritten, as it says


# ---------------------------------------------------------------------------------------------- server
def _server(index: Path):
    from live_server import start_server

    proc, port = start_server(index, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield port, proc
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()[-3000:]


@pytest.fixture(scope="module")
def hostile_server(hostile_engine):
    yield from _server(hostile_engine[-1] / "index")


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    yield from _server(tiny_engine / "index")


@pytest.fixture(scope="module")
def a_jpeg(sample_root) -> bytes:
    return sorted((sample_root / "images" / "test").rglob("*.jpg"))[0].read_bytes()


def _post(port, fields: list, headers: dict | None = None, boundary: str = "b0undary"):
    """POST /locate with the multipart parts [(name, filename or None, bytes)]: (status, JSON)."""
    import http.client

    body = b"".join(
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
         + (f"; filename=\"{filename}\"" if filename else "") + "\r\n\r\n").encode() + data + b"\r\n"
        for name, filename, data in fields) + f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/locate", body, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                           **(headers or {})})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def _get(port, path: str):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.getheader("content-type"), r.read()


def _rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(key)


def test_gallery_thumbnails_in_sub_folders_with_their_own_type(hostile, hostile_server):
    root, _, _ = hostile
    port, _ = hostile_server
    for path in ("/gallery/2024/00/p00000.jpg", "/gallery/2024%2F00%2Fp00000.jpg"):
        status, ctype, body = _get(port, path)
        assert status == 200 and ctype == "image/jpeg", path
        assert body == (root / "2024" / "00" / "p00000.jpg").read_bytes()
    status, ctype, body = _get(port, "/gallery/2025/00/p00003.png")
    assert status == 200 and ctype == "image/png" and body == (root / "2025/00/p00003.png").read_bytes()
    status, ctype, body = _get(port, "/gallery/2024/01/p00004.tif")  # browsers show no TIFF: a JPEG
    assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(body)) as im, Image.open(root / "2024/01/p00004.tif") as tif:
        assert im.size == tif.size  # small already: converted, not resized
    for refused in ("/gallery/2024/../../coords.csv", "/gallery/%2e%2e/coords.csv", "/gallery/refs/x_ref.jpg"):
        status, ctype, body = _get(port, refused)
        assert status == 404 and "no gallery image" in json.loads(body)["error"], refused
    status, _, body = _get(port, "/gallery/linked.jpg")
    assert status == 404 and "link to a file outside the gallery folder" in json.loads(body)["error"]


def test_form_fields_given_twice_and_long_boundaries_are_refused(tiny_server, a_jpeg):
    port, _ = tiny_server
    jpeg = a_jpeg
    status, body = _post(port, [("image", "a.jpg", jpeg), ("within", None, b"US"), ("within", None, b"FR")])
    assert status == 400 and "'within' is given more than once" in body["error"]
    status, body = _post(port, [("image", "a.jpg", jpeg), ("image", "b.jpg", jpeg)])
    assert status == 400 and "2 files in the form field `image`" in body["error"]
    status, body = _post(port, [("image", "a.jpg", jpeg), ("within", None, b",")])
    assert status == 400 and "names no country" in body["error"]
    status, body = _post(port, [("image", "a.jpg", jpeg)], boundary="b" * 300)
    assert status == 400 and "unreadable multipart form" in body["error"]
    status, body = _post(port, [("image", "a.jpg", jpeg)])
    assert status == 200 and body["image"] == "a.jpg"


def test_a_web_page_of_another_site_cannot_post(tiny_server, a_jpeg):
    port, _ = tiny_server
    jpeg = a_jpeg
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:80",
                   f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}"):  # another port; another name
        status, body = _post(port, [("image", "a.jpg", jpeg)], {"Origin": origin})
        assert status == 403 and "web page of another site" in body["error"], origin
    status, body = _post(port, [("image", "a.jpg", jpeg)], {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200  # the server's own page


def test_a_client_that_disconnects_mid_upload_is_one_log_line(tiny_engine):
    import socket

    from live_server import start_server

    proc, port = start_server(tiny_engine / "index", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      b"boundary=b0undary\r\nContent-Length: 100000\r\n\r\n--b0undary\r\n")
            time.sleep(0.5)
        time.sleep(1.0)
        assert _get(port, "/health")[0] == 200  # still serving
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err and b"Traceback" not in out, (err + out).decode()[-3000:]
    assert out.count(b"a client disconnected before its upload arrived") == 1, out.decode()[-2000:]


@pytest.mark.slow
def test_concurrent_large_png_uploads_decode_within_a_budget(tiny_engine):
    """16 uploads at once of a 131 KB PNG that decodes to 40 MP: decoded two at a time and shrunk at
    once, the server's peak memory grows by far less than 16 decoded images (today's main: ~4 GB)."""
    from concurrent.futures import ThreadPoolExecutor

    from live_server import start_server

    out = tiny_engine
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (120, 130, 140)).save(buf, "PNG")
    png = buf.getvalue()
    assert len(png) < 300_000
    proc, port = start_server(out / "index", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _get(port, "/health")[0] == 200
        before = _rss_mb(proc.pid, "VmRSS")
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda i: _post(port, [("image", f"flat{i}.png", png)]), range(16)))
        assert all(status == 200 for status, _ in replies), replies[:2]
        grown = _rss_mb(proc.pid, "VmHWM") - before
        one_image_mb = 6300 * 6300 * 3 / 2**20  # 114 MB of RGB
        print(f"peak grew by {grown:.0f} MB")
        assert grown < 5 * one_image_mb, f"peak grew by {grown:.0f} MB"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()[-3000:]
