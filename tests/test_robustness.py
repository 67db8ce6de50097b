"""Every bad input a careless or hostile user can give, through the real commands: each gets one `error:`
line that names the culprit, a nonzero exit, no traceback, and nothing already written is damaged.

`run(main, argv)` calls a command in-process: an exception escaping main() is a traceback a user would
see, and fails the test with that word."""
import contextlib
import csv
import gzip
import hashlib
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from benchmark.score import main as score_main
from embed.build import main as embed_main
from finetune.train import main as train_main
from retrieve.query import main as query_main

from live_server import start_server

ROOT = Path(__file__).resolve().parents[1]
TINY = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                   "head_width": 16}})


def run(main, argv) -> tuple[int, str]:
    """(exit code, stderr) of a command; fails on any exception that would reach the user."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException:  # noqa: BLE001
            pytest.fail("Traceback reached the user:\n" + traceback.format_exc())
    text = err.getvalue()
    assert "Traceback" not in text, text
    return rc, text


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def small(sample_root, tmp_path):
    """A copy of the first 60 train rows and images of the small sample, and its CSV lines."""
    root = tmp_path / "ds"
    lines = (sample_root / "train.csv").read_text().splitlines()[:61]
    (root / "images" / "train").mkdir(parents=True)
    header = next(csv.reader([lines[0]]))
    for line in lines[1:]:
        i = next(csv.reader([line]))[header.index("id")]
        src = next((sample_root / "images" / "train").rglob(f"{i}.jpg"))
        shutil.copy(src, root / "images" / "train" / f"{i}.jpg")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root, lines


def _id(line: str) -> str:
    return next(csv.reader([line]))[0]


def embed(root, tiny_model, out, *extra):
    return run(embed_main, ["--data", root, "--model", tiny_model, "--out", out, "--workers", "0",
                            "--set", "tune=false", *extra])


# ------------------------------------------------------------------------------------------- datasets
def test_an_unbalanced_quote_is_found_and_named(small, tiny_model, tmp_path):
    root, lines = small
    # quoted only where needed, as pandas writes OSV-5M's CSVs: then one stray quote swallows the rest
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv.reader(lines))
    bad = buf.getvalue().splitlines()
    bad[6] = bad[6].rsplit(",", 1)[0] + ',"5'  # a value that opens a quote and never closes it
    for name, text in (("small", "\n".join(bad) + "\n"),
                       ("big", "\n".join(bad + [bad[7]] * 30_000) + "\n")):  # > 1 MiB: pyarrow's blocks
        (root / "train.csv").write_text(text)
        before = digest(root)
        rc, err = embed(root, tiny_model, tmp_path / name)
        assert rc == 2, err
        assert "train.csv" in err and "line 7" in err and "unbalanced" in err
        assert not (tmp_path / name).exists() and digest(root) == before


@pytest.mark.parametrize("kind,expected", [
    ("bom", None), ("latin1", "is not UTF-8"), ("utf16", "is UTF-16"), ("gzip", "is gzip-compressed"),
    ("semicolon", "separated by semicolons"), ("header-only", "0 usable rows of 0: the file has a header only"),
])
def test_csv_encodings_and_shapes(small, tiny_model, tmp_path, kind, expected):
    root, lines = small
    text = "\n".join(lines) + "\n"
    data = {"bom": b"\xef\xbb\xbf" + text.encode(),
            "latin1": text.replace(_id(lines[3]), _id(lines[3]) + "\xe9", 1).encode("latin-1"),
            "utf16": text.encode("utf-16"), "gzip": gzip.compress(text.encode()),
            "semicolon": text.replace(",", ";").encode(), "header-only": (lines[0] + "\n").encode()}[kind]
    if kind == "latin1":  # the accent inside an id: a column geovote reads
        assert b"\xe9" in data
    (root / "train.csv").write_bytes(data)
    before = digest(root)
    rc, err = embed(root, tiny_model, tmp_path / "out")
    if expected is None:
        assert rc == 0, err
    else:
        assert rc == 2 and expected in err and "train.csv" in err, err
        assert not (tmp_path / "out" / "embeddings" / "train" / "plan.json").exists()
    assert digest(root) == before  # never a rejects file or anything else inside the dataset


def test_no_usable_row_says_why_and_where_images_are_expected(small, tiny_model, tmp_path):
    root, _ = small
    (root / "images" / "train").rename(root / "images" / "Train")
    rc, err = embed(root, tiny_model, tmp_path / "out")
    assert rc == 2
    assert "0 usable rows of 60 (60 image missing)" in err
    assert f"images are expected at {root / 'images' / 'train'}/**/<id>.jpg" in err
    assert "does not exist (images/ holds: Train)" in err
    assert not (tmp_path / "out" / "embeddings" / "train" / "plan.json").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--batch-size", "-1"], "batch_size must be at least 1, got -1"),
    (["--set", "shard_rows=0"], "shard_rows must be at least 1"),
    (["--workers", "-3"], "workers must be -1 (auto)"),
    (["--set", "index_factory='IVFxx,PQ'"], "index_factory 'IVFxx,PQ' is not a FAISS factory string"),
    (["--set", "nonsense=1"], "unknown key 'nonsense'"),
])
def test_embed_settings_are_checked_before_anything_is_written(small, tiny_model, tmp_path, argv, expected):
    root, _ = small
    rc, err = embed(root, tiny_model, tmp_path / "out", *argv)
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "out" / "embeddings").exists()


def test_an_untrainable_index_factory_is_named_and_leaves_no_index(small, tiny_model, tmp_path):
    root, _ = small
    rc, err = run(embed_main, ["--data", root, "--model", tiny_model, "--out", tmp_path / "out", "--workers", "0",
                               "--set", "index_factory='IVF4096,Flat'"])
    assert rc == 2 and "cannot train IVF4096,Flat on 60 vectors" in err, err
    assert not (tmp_path / "out" / "index").exists() and not (tmp_path / "out" / "index.partial").exists()
    assert (tmp_path / "out" / "embeddings" / "train" / "manifest.json").exists()  # the embeddings are kept


def test_one_training_image_is_indexed_and_said_untuned(small, tiny_model, tmp_path, capsys):
    root, lines = small
    (root / "train.csv").write_text("\n".join(lines[:2]) + "\n")
    out = tmp_path / "out"
    assert embed_main(["--data", str(root), "--model", str(tiny_model), "--out", str(out), "--workers", "0"]) == 0
    assert "not tuned: only 0 of 1 tuning images have neighbours" in capsys.readouterr().out
    assert not (out / "index" / "retrieve.json").exists()
    img = next((root / "images" / "train").glob("*.jpg"))
    rc, err = run(query_main, [img, "--index", out / "index", "--json"])
    assert rc == 0 and "retrieve.json is missing" in err and "python -m retrieve.tune" in err


# --------------------------------------------------------------------------------------------- finetune
@pytest.mark.parametrize("setting,expected", [
    ("train='last:x'", "train: expected all, frozen or last:N"), ("batch_size=0", "batch_size must be at least 1"),
    ("views=0", "views must be at least 1"), ("arch='notjson'", "arch: not JSON"),
    ("save_dtype='int8'", "save_dtype must be one of"), ("epochs=-1", "must be >= 0"),
])
def test_finetune_settings_are_checked_before_anything_is_written(tmp_path, setting, expected):
    rc, err = run(train_main, ["--set", setting, "--set", f"out={json.dumps(str(tmp_path / 'run'))}"])
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_finetune_skips_an_unreadable_image_and_lists_it(sample_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(sample_root, root)
    victim = sorted((root / "images" / "train").rglob("*.jpg"))[5]
    victim.write_bytes(b"\xff\xd8 truncated")
    before = digest(root)
    sets = {"data": str(root), "arch": TINY, "epochs": 1, "workers": 0, "out": str(tmp_path / "run"),
            "quadtree_max_points": 200, "batch_size": 128}
    rc, err = run(train_main, [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")])
    assert rc == 0, err
    failures = (tmp_path / "run" / "failures.csv").read_text().splitlines()
    assert len(failures) == 2 and str(victim) in failures[1] and failures[1].startswith("train,")
    assert (tmp_path / "run" / "best" / "manifest.json").exists()
    assert digest(root) == before


def test_finetune_without_val_says_what_it_validates_on_and_writes_nothing_into_the_dataset(small, tmp_path):
    """OSV-5M has no val: fine-tuning validates on train images held out (issue #15), says so, and leaves
    the dataset as it found it."""
    root, _ = small
    before = digest(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train_main(["--set", f"data={json.dumps(str(root))}", "--set", f"arch={json.dumps(TINY)}",
                         "--set", f"out={json.dumps(str(tmp_path / 'run'))}", "--set", "epochs=1",
                         "--set", "workers=0", "--set", "batch_size=16"])
    assert rc == 0, err.getvalue()
    assert "has no val split: validating on 6 train images held out" in out.getvalue()
    assert digest(root) == before


# ------------------------------------------------------------------------------------------------ index
@pytest.fixture()
def engine_copy(tiny_engine, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    return out


def _query(engine, sample_root, *extra):
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    return run(query_main, [img, "--index", engine / "index", "--json", *extra])


@pytest.mark.parametrize("name,damage", [
    ("index.faiss", "truncate"), ("index.faiss", "empty"), ("refine.faiss", "truncate"),
    ("latitude.npy", "truncate"), ("ids.npy", "empty"), ("index.json", "garbage"), ("retrieve.json", "garbage"),
])
def test_a_damaged_index_file_is_named(engine_copy, sample_root, name, damage):
    path = engine_copy / "index" / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"{\n  oops"}[damage])
    rc, err = _query(engine_copy, sample_root)
    assert rc == 2 and str(path) in err, err


def test_a_damaged_cells_cache_is_rebuilt_not_trusted(engine_copy, sample_root, capsys):
    assert query_main([str(sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]), "--index",
                       str(engine_copy / "index"), "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    from retrieve.engine import Engine

    engine = Engine(engine_copy / "index")
    cache = engine.layout.cells(engine.params.cell_spec, engine.index.digest)  # the table voted over
    assert cache.exists()
    cache.write_bytes(cache.read_bytes()[:200])
    rc, _ = _query(engine_copy, sample_root)
    assert rc == 0
    assert query_main([str(sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]), "--index",
                       str(engine_copy / "index"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == good
    assert len(cache.read_bytes()) > 200  # written again, whole


def test_index_pointed_at_the_engine_folder_asks_did_you_mean(engine_copy, sample_root):
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    rc, err = run(query_main, [img, "--index", engine_copy])
    assert rc == 2 and f"did you mean --index {engine_copy / 'index'}?" in err


def test_an_index_folder_may_have_any_name(engine_copy, sample_root, capsys):
    renamed = engine_copy / "my-index"
    (engine_copy / "index").rename(renamed)
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    assert query_main([str(img), "--index", str(renamed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(img)


# ------------------------------------------------------------------------------------------------ score
def test_score_refuses_what_it_cannot_read(sample_root, tmp_path):
    truth = sample_root / "test.csv"
    header_only = tmp_path / "p.csv"
    header_only.write_text("id,latitude,longitude\n")
    rc, err = run(score_main, [header_only, "--truth", truth, "--subset"])
    assert rc == 2 and "holds no predictions" in err and str(header_only) in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "latitude": [1.0], "longitude": [2.0]}), tmp_path / "p.parquet")
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    rc, err = run(score_main, [tmp_path / "p.parquet", "--truth", truth])
    assert rc == 2 and "is not a readable parquet file" in err
    bom_truth = tmp_path / "truth.csv"
    bom_truth.write_bytes(b"\xef\xbb\xbf" + truth.read_bytes())
    ids = [line.split(",")[0] for line in truth.read_text().splitlines()[1:]]
    (tmp_path / "all.csv").write_text("id,latitude,longitude\n" + "".join(f"{i},1.0,2.0\n" for i in ids))
    assert run(score_main, [tmp_path / "all.csv", "--truth", bom_truth])[0] == 0


# ------------------------------------------------------------------------------------------------ serve
def _serve(engine, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "retrieve.serve", "--index", str(engine / "index"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_serve_refuses_a_bad_or_busy_port_before_the_banner(tiny_engine):
    r = _serve(tiny_engine, "--port", "99999")
    assert r.returncode == 2 and "--port must be between 1 and 65535" in r.stderr and not r.stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _serve(tiny_engine, "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "geovote:" not in r.stdout
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def live(tiny_engine, tmp_path_factory):
    """A real server (uvicorn) with a 2-second upload timeout and its own empty temporary folder."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    proc, port = start_server(tiny_engine / "index", "--max-upload-mb", "0.2", "--upload-timeout-s", "2",
                              env={"TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield port, tmp
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()[-3000:]


def _reply(s: socket.socket, data: bytes = b"") -> tuple[int, dict]:
    """Read one HTTP reply from the socket: (status, JSON body)."""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
        if length and len(body) >= length[0]:
            break
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return int(head.split(b" ")[1]), json.loads(body)


def _raw(port, request: bytes, timeout=20.0) -> tuple[int, dict]:
    """Send raw bytes; (status, JSON body) of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return _reply(s)


def _form(payload: bytes, boundary="b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()


def test_hostile_requests_get_json_errors(live, sample_root):
    port, tmp = live
    ctype = b"Content-Type: multipart/form-data; boundary=b0undary\r\n"
    base = b"POST /locate HTTP/1.1\r\nHost: 127.0.0.1\r\n" + ctype
    # a chunked upload (no Content-Length) far over the 0.2 MB limit: answered 413 as soon as the limit
    # is passed, while the client is still sending
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(base + b"Transfer-Encoding: chunked\r\n\r\n")
        sent, reply = 0, b""
        for _ in range(200):  # up to 20 MB
            chunk = _form(b"\0" * 100_000)
            try:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([s], [], [], 0.05)[0]:
                reply = s.recv(65536)
                break
        status, answer = _reply(s, reply)
    assert status == 413 and "over the limit of 209,715 bytes" in answer["error"], answer
    assert sent < 3_000_000, sent  # the answer came after about the limit, not after the whole body
    assert list(tmp.iterdir()) == []  # nothing spooled to a temporary file
    # a Content-Length longer than the body: 408 after the upload timeout, not a hang
    body = _form(b"x" * 100)
    status, reply = _raw(port, base + f"Content-Length: {len(body) + 500}\r\n\r\n".encode() + body)
    assert status == 408 and "did not arrive within 2 s" in reply["error"]
    # a Content-Length shorter than the body: the form is cut, and said to be
    status, reply = _raw(port, base + f"Content-Length: {len(body) - 30}\r\n\r\n".encode() + body)
    assert status == 400 and "ends before its closing boundary" in reply["error"]
    # another host name (DNS rebinding): refused
    status, reply = _raw(port, b"GET /health HTTP/1.1\r\nHost: evil.example:8765\r\n\r\n")
    assert status == 400 and "'evil.example:8765' is not served here" in reply["error"]
    # unknown paths and methods: the same {"error"} body as every refusal
    status, reply = _raw(port, b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 404 and reply == {"error": "Not Found"}
    status, reply = _raw(port, b"GET /locate HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 405 and reply == {"error": "Method Not Allowed"}
    # and a good upload still works
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0].read_bytes()
    body = _form(img)
    status, reply = _raw(port, base + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status == 200 and -90 <= reply["latitude"] <= 90


# ----------------------------------------------------------------------------------------------- kills
def _embed_cmd(root, model, out, *extra):
    return [sys.executable, "-m", "embed.build", "--data", str(root), "--model", str(model), "--out", str(out),
            "--workers", "0", *extra]


@pytest.mark.slow
def test_a_run_killed_during_tuning_is_finished_by_a_rerun(sample_root, tiny_model, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(sample_root, tiny_model, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "index" / "index.json").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the index is there; val embedding and tuning are not done
    proc.wait()
    assert (out / "index" / "index.json").exists() and not (out / "index" / "retrieve.json").exists()
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    rc, err = run(query_main, [img, "--index", out / "index", "--json"])
    assert rc == 0 and "retrieve.json is missing" in err  # said aloud, not silently untuned
    r = subprocess.run(_embed_cmd(sample_root, tiny_model, out), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is up to date with the embeddings" in r.stdout  # not rebuilt
    clean = tmp_path / "clean"
    subprocess.run(_embed_cmd(sample_root, tiny_model, clean), cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    a = json.loads((out / "index" / "retrieve.json").read_text())
    b = json.loads((clean / "index" / "retrieve.json").read_text())
    assert a["params"] == b["params"] and a["validation"]["voting"] == pytest.approx(b["validation"]["voting"])


# ------------------------------------------------------------------ found by an adversarial review
def test_a_folder_named_like_a_model_does_not_take_its_place(tmp_path, monkeypatch):
    from embed.models import canonical_name, load_backbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    (tmp_path / "vit-b-32-openai").mkdir()
    assert canonical_name("default") == "default" and canonical_name("vit-b-32-openai") == "vit-b-32-openai"
    assert load_backbone("default").name.startswith("geovote-default@")


@pytest.mark.parametrize("suffix,content", [(".bin", b"not a pickle at all"), (".safetensors", b"\x08\x00garbage"),
                                            (".pt", b"")])
def test_a_broken_weights_file_is_named(small, tmp_path, suffix, content, tiny_model):
    root, _ = small
    weights = tmp_path / f"w{suffix}"
    weights.write_bytes(content)
    rc, err = run(embed_main, ["--data", root, "--model", f"ViT-B-32:{weights}", "--out", tmp_path / "out",
                               "--workers", "0"])
    assert rc == 2 and str(weights) in err and "open_clip could not load the weights file" in err, err
    assert not (tmp_path / "out").exists()


def test_csv_problems_past_the_header_and_without_a_line_end(small, tiny_model, tmp_path):
    root, lines = small
    rows = lines + [lines[1]] * 400  # > 8 KB of rows before the bad one
    bad_id = _id(lines[2])
    text = "\n".join(rows + [lines[3].replace(_id(lines[3]), bad_id + "\xe9", 1)]) + "\n"
    (root / "train.csv").write_bytes(text.encode("latin-1"))
    rc, err = embed(root, tiny_model, tmp_path / "a")
    assert rc == 2 and "is not UTF-8 text" in err and "train.csv" in err, err
    (root / "train.csv").write_text(lines[0])  # a header and no line end
    rc, err = embed(root, tiny_model, tmp_path / "b")
    assert rc == 2 and "0 usable rows of 0" in err, err


def test_finetune_batch_larger_than_the_training_set(small, tmp_path):
    root, _ = small
    shutil.copy(root / "train.csv", root / "val.csv")
    shutil.copytree(root / "images" / "train", root / "images" / "val")
    sets = {"data": str(root), "arch": TINY, "batch_size": 1000, "workers": 0, "out": str(tmp_path / "run")}
    rc, err = run(train_main, [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")])
    assert rc == 2 and "batch_size 1000 is more than the 60 training images" in err, err


def test_query_output_and_top_are_checked(engine_copy, sample_root, tmp_path):
    rc, err = run(query_main, ["--split", "test", "--data", sample_root, "--index", engine_copy / "index",
                               "--out", tmp_path])
    assert rc == 2 and "give a file name ending in .parquet, .csv or .geojson" in err
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    rc, err = run(query_main, [img, "--index", engine_copy / "index", "--top", "0"])
    assert rc == 2 and "--top must be at least 1" in err


def test_a_bad_hub_endpoint_is_named(monkeypatch):
    from geovote.hub import OfflineError, check_online

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "notaurl")
    with pytest.raises(OfflineError, match="HF_ENDPOINT 'notaurl' is not an http"):
        check_online()


def test_host_headers_are_parsed_not_pattern_matched(live):
    port, _ = live
    status, reply = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:80@evil.com\r\n\r\n")
    assert status == 400 and "is not served here" in reply["error"]
    status, reply = _raw(port, b"GET /health HTTP/1.1\r\nHost: LOCALHOST:1\r\n\r\n")
    assert status == 200 and reply["ready"]
