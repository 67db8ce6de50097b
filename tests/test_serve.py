"""The HTTP API and page: answers, health, OpenAPI, and every kind of bad or hostile upload."""
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embed.build import main as embed_main
from live_server import start_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(sample_root, tiny_model, tmp_path_factory):
    from fastapi.testclient import TestClient

    from retrieve.engine import Engine
    from retrieve.app import create_app

    out = tmp_path_factory.mktemp("serve-engine")
    assert embed_main(["--data", str(sample_root), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0", "--set", "tune=false"]) == 0
    app = create_app(Engine(out / "index"), max_upload_bytes=200_000, max_pixels=4_000_000)
    with TestClient(app, base_url="http://127.0.0.1") as client:  # one event loop for the module
        yield client, out


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_locate_answers_like_query_json_plus_neighbours(served, sample_root, capsys):
    from embed.images import open_rgb
    from retrieve.engine import Engine
    from retrieve.query import main as query_main

    client, out = served
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    r = client.post("/locate", files={"image": (img.name, img.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    a = r.json()
    # the answer is retrieve.query's for the same file, under the upload's name
    assert query_main([str(img), "--index", str(out / "index"), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in a.items() if k != "neighbours"} == {**want, "image": img.name}
    # and the neighbours are the index's k nearest, in order
    engine = Engine(out / "index")
    res = engine.search(engine.embed_images([open_rgb(img, engine.backbone.image_size)]), engine.params.k)
    assert [n["id"] for n in a["neighbours"]] == list(res.ids[0])
    assert [n["similarity"] for n in a["neighbours"]] == pytest.approx(res.similarity[0], abs=1e-4)
    assert [(n["latitude"], n["longitude"]) for n in a["neighbours"]] == list(zip(res.lat_deg[0], res.lon_deg[0]))


def test_health_answers_while_an_inference_runs(served, sample_root):
    """/locate decodes and infers off the event loop: /health is answered while an inference is held."""
    import threading

    client, _ = served
    engine = client.app.state.engine
    started, release = threading.Event(), threading.Event()
    real = engine.embed_images

    def held(images):
        started.set()
        assert release.wait(30), "never released"
        return real(images)

    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    engine.embed_images = held
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post(
        "/locate", files={"image": (img.name, img.read_bytes(), "image/jpeg")})))
    try:
        worker.start()
        assert started.wait(30)
        t0 = time.perf_counter()
        h = client.get("/health")
        waited = time.perf_counter() - t0
        assert h.status_code == 200 and worker.is_alive() and not release.is_set()
        assert waited < 5, waited
    finally:
        release.set()
        worker.join(60)
        engine.embed_images = real
    assert result["r"].status_code == 200


def test_health_openapi_and_page(served):
    client, _ = served
    h = client.get("/health").json()
    assert h["ready"] and h["images"] == 2000 and h["backbone"].startswith("tiny@")
    spec = client.get("/openapi.json").json()
    assert {"/locate", "/health"} <= set(spec["paths"])
    assert "drop" in client.get("/").text.lower()
    assert client.get("/world.jpg").content[:2] == b"\xff\xd8"
    assert "fetch(\"/locate\"" in client.get("/app.js").text


@pytest.mark.parametrize("name,payload,ctype,status,message", [
    ("text.jpg", b"<html>not a picture</html>", "image/jpeg", 415, "not an image"),
    ("empty.jpg", b"", "image/jpeg", 400, "empty"),
    ("trunc.jpg", _jpeg((400, 300))[:600], "image/jpeg", 422, "unreadable"),
    ("big.jpg", _jpeg((800, 800)) + b"\0" * 250_000, "image/jpeg", 413, "over the limit"),
])
def test_bad_uploads_get_a_clear_4xx(served, name, payload, ctype, status, message):
    client, _ = served
    r = client.post("/locate", files={"image": (name, payload, ctype)})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_decompression_bomb_is_refused_before_decoding(served):
    client, _ = served
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")  # 25 MP in a few kB
    assert len(buf.getvalue()) < 200_000
    r = client.post("/locate", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "too large: 5000x5000" in r.json()["error"]


def test_wrong_requests(served):
    client, _ = served
    r = client.post("/locate", content=json.dumps({"url": "http://example.com/a.jpg"}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = client.post("/locate", data={"other": "x"}, files={"nothing": ("a.txt", b"x", "text/plain")})
    assert r.status_code == 400 and "field `image`" in r.json()["error"]
    r = client.post("/locate")
    assert r.status_code == 415


def _sequence_images(sample_root, n=3):
    """The first n photos of the sample's first test sequence of at least n."""
    from geovote.data import read_split
    from retrieve.album import groups

    s = read_split(sample_root, "test", columns=["sequence"])
    rows = next(g for g in groups(s.column("sequence").astype(str)) if len(g) >= n)[:n]
    return [s.image_paths()[i] for i in rows]


def test_locate_together_answers_like_query_together(tiny_engine, sample_root, served, capsys):
    """Several `image` files with together=true: the answer of `retrieve.query --together --json` for the
    same files (under the uploads' names); without together, or on an engine never tuned, refused."""
    from fastapi.testclient import TestClient

    from retrieve.app import create_app
    from retrieve.engine import Engine
    from retrieve.query import main as query_main

    paths = _sequence_images(sample_root)
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    with TestClient(create_app(Engine(tiny_engine / "index")), base_url="http://127.0.0.1") as client:
        r = client.post("/locate", files=files, data={"together": "true"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert query_main([*map(str, paths), "--together", "--json", "--index", str(tiny_engine / "index")]) == 0
        want = json.loads(capsys.readouterr().out)
        names = [p.name for p in paths]
        assert got["images"] == names and [p["image"] for p in got["photos"]] == names
        same = {k: v for k, v in want.items() if k not in ("images", "photos")}
        assert {k: got[k] for k in same} == same
        assert [{k: v for k, v in p.items() if k != "image"} for p in got["photos"]] == \
            [{k: v for k, v in p.items() if k != "image"} for p in want["photos"]]
        r = client.post("/locate", files=files)
        assert r.status_code == 400 and "together=true" in r.json()["error"]
        r = client.post("/locate", files=files, data={"together": "maybe"})
        assert r.status_code == 400 and "together must be true or false" in r.json()["error"]
        bad = files[:2] + [("image", ("bad.jpg", b"not an image", "image/jpeg"))]
        r = client.post("/locate", files=bad, data={"together": "true"})
        assert r.status_code == 415 and r.json()["error"].startswith("bad.jpg: not an image")
    client, _ = served  # built with tune=false
    r = client.post("/locate", files=files, data={"together": "true"})
    assert r.status_code == 422 and "not tuned" in r.json()["error"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_in_a_real_browser(tiny_engine, sample_root, tmp_path):
    """On a tuned (so calibrated) engine: the page shows the probability and draws the 90% radius on a
    Leaflet map (offline here: the Blue Marble layer); three photos dropped together get one answer,
    each photo's own, and a GeoJSON download."""
    from fastapi.testclient import TestClient
    from playwright.sync_api import sync_playwright

    from retrieve.app import create_app
    from retrieve.engine import Engine

    server, port = start_server(tiny_engine / "index", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('health').textContent.includes('training images')")
            page.set_input_files("#file", str(img))
            page.wait_for_selector("#place", timeout=30_000)
            coords = page.text_content("#coords")
            lat, lon = (float(v) for v in coords.split(","))
            assert -90 <= lat <= 90 and -180 <= lon <= 180
            assert page.locator(".marker.answer").count() == 1
            # the page shows what the API answers for the same file
            with TestClient(create_app(Engine(tiny_engine / "index")), base_url="http://127.0.0.1") as client:
                want = client.post("/locate", files={"image": (img.name, img.read_bytes(), "image/jpeg")}).json()
            assert want["calibrated"] and want["radius_km"] > 0
            assert (lat, lon) == pytest.approx((want["latitude"], want["longitude"]), abs=1e-4)
            assert page.locator(".marker.neighbour").count() == len(want["neighbours"])
            assert page.text_content("#confidence") == f"{want['confidence']:.0%}"
            # the 90% radius is drawn around the answer at its true size, and stated
            assert page.locator(".marker.radius").count() == 1
            assert page.evaluate("window.geovote.circle.getRadius()") == pytest.approx(1000 * want["radius_km"])
            assert page.evaluate("[window.geovote.circle.getLatLng().lat, window.geovote.circle.getLatLng().lng]") \
                == pytest.approx([want["latitude"], want["longitude"]])
            assert page.text_content("#radius-km") == f"{round(want['radius_km']):,} km"
            # no network here: OpenStreetMap's tiles fail and the bundled Blue Marble is the map
            page.wait_for_function("window.geovote.base() === 'blue-marble'", timeout=30_000)
            page.wait_for_function("document.querySelector('img.leaflet-image-layer')?.naturalWidth > 0")
            assert page.locator("#far-pick").count() == int(want["far_pick"])
            # a photo of a far place the far pick answers: the page says so
            with TestClient(create_app(Engine(tiny_engine / "index")), base_url="http://127.0.0.1") as client:
                for far_img in sorted((sample_root / "images" / "test_far").rglob("*.jpg"))[:20]:
                    far = client.post("/locate", files={"image": (far_img.name, far_img.read_bytes(),
                                                                  "image/jpeg")}).json()
                    if far["far_pick"]:
                        break
            assert far["far_pick"] == (far["kind"] == "far_pick")
            if far["far_pick"]:
                page.set_input_files("#file", str(far_img))
                page.wait_for_selector("#far-pick", timeout=30_000)
                assert "looks far from every training image" in page.text_content("#far-pick")
            # the evidence: the nearest gallery images as thumbnails, served from the gallery
            page.wait_for_function("[...document.querySelectorAll('#evidence img')].every(i => i.complete)")
            assert page.locator("#evidence img").count() == min(8, len(want["neighbours"]))
            assert page.evaluate("document.querySelector('#evidence img').naturalWidth") > 0
            # a bad file shows the server's error on the page
            page.set_input_files("#file", files=[{"name": "bad.jpg", "mimeType": "image/jpeg",
                                                  "buffer": b"not an image"}])
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "not an image" in page.text_content("#error")
            _drop_three_photos(page, sample_root, tiny_engine, tmp_path)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_concurrent_uploads_share_a_batch_and_get_their_own_answers(served, sample_root):
    """While one batch runs, the uploads that arrive wait together and go as one batch; each gets the
    answer it would get alone."""
    import threading

    client, _ = served
    engine, batcher = client.app.state.engine, client.app.state.batcher
    imgs = sorted((sample_root / "images" / "test").rglob("*.jpg"))[:9]
    alone = {p.name: client.post("/locate", files={"image": (p.name, p.read_bytes(), "image/jpeg")}).json()
             for p in imgs}
    started, release = threading.Event(), threading.Event()
    real = engine.embed_images

    def held(images):
        if not started.is_set():  # the first batch holds until the others have queued up
            started.set()
            assert release.wait(30)
        return real(images)

    engine.embed_images = held
    before = len(batcher.batches)
    answers = {}
    post = lambda p: answers.__setitem__(p.name, client.post(  # noqa: E731
        "/locate", files={"image": (p.name, p.read_bytes(), "image/jpeg")}))
    first = threading.Thread(target=post, args=(imgs[0],))
    try:
        first.start()
        assert started.wait(30)
        rest = [threading.Thread(target=post, args=(p,)) for p in imgs[1:]]
        for t in rest:
            t.start()
        deadline = time.time() + 30
        while batcher.waiting < len(rest) and time.time() < deadline:
            time.sleep(0.01)
        assert batcher.waiting == len(rest)
    finally:
        release.set()
        first.join(60)
        for t in rest:
            t.join(60)
        engine.embed_images = real
    assert list(batcher.batches)[before:] == [1, len(rest)]  # the held one, then all the others together
    for p in imgs:
        got, want = answers[p.name].json(), alone[p.name]
        assert got["image"] == p.name and got["country"] == want["country"]
        assert (got["latitude"], got["longitude"]) == pytest.approx((want["latitude"], want["longitude"]), abs=1e-4)


def test_a_full_queue_answers_503_with_retry_after(sample_root, tiny_engine):
    import threading

    from fastapi.testclient import TestClient

    from retrieve.app import create_app
    from retrieve.engine import Engine

    engine = Engine(tiny_engine / "index")
    app = create_app(engine, max_queue=1)
    started, release = threading.Event(), threading.Event()
    real = engine.embed_images

    def held(images):
        started.set()
        assert release.wait(30)
        return real(images)

    engine.embed_images = held
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    files = {"image": (img.name, img.read_bytes(), "image/jpeg")}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        results = []
        t1 = threading.Thread(target=lambda: results.append(client.post("/locate", files=files)))
        t2 = threading.Thread(target=lambda: results.append(client.post("/locate", files=files)))
        try:
            t1.start()
            assert started.wait(30)  # the first is being answered
            t2.start()
            deadline = time.time() + 30
            while app.state.batcher.waiting < 1 and time.time() < deadline:
                time.sleep(0.01)
            r = client.post("/locate", files=files)  # the queue (1) is full
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
            assert client.get("/health").json()["waiting"] == 1
        finally:
            release.set()
            t1.join(60)
            t2.join(60)
    assert [r.status_code for r in results] == [200, 200]


def test_the_batcher_survives_a_new_event_loop_and_a_failing_batch():
    """A second event loop (a restarted server, a second TestClient) gets its own queue and worker; a
    batch that fails is answered one request at a time, so only the bad request fails."""
    import asyncio

    from retrieve.batcher import Batcher

    def answer(images, names):
        if "bad" in names:
            raise ValueError("bad image")
        return [f"{n}:{i}" for i, n in zip(images, names)]

    batcher = Batcher(answer, wait_ms=20)

    async def burst(names):
        return await asyncio.gather(*(batcher.submit(i, n) for i, n in enumerate(names)), return_exceptions=True)

    assert asyncio.run(burst(["a", "b"])) == ["a:0", "b:1"]
    got = asyncio.run(burst(["c", "bad", "d"]))  # another loop; and one request that fails its batch
    assert got[0] == "c:0" and got[2] == "d:2" and isinstance(got[1], ValueError)
    assert list(batcher.batches) == [2, 3]  # each burst went as one batch (the failed one then retried alone)


def test_gallery_serves_only_the_engines_own_training_images(served, sample_root):
    """GET /gallery/<id>: the training image behind a neighbour, byte for byte; nothing else."""
    client, out = served
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    a = client.post("/locate", files={"image": (img.name, img.read_bytes(), "image/jpeg")}).json()
    first = a["neighbours"][0]["id"]
    r = client.get(f"/gallery/{first}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == next((sample_root / "images" / "train").rglob(f"{first}.jpg")).read_bytes()
    test_id = img.stem  # a real image of the dataset, but not in the engine's gallery (test split)
    for bad in (test_id, "nope", "..%2F..%2Fval.csv", "%2E%2E"):
        assert client.get(f"/gallery/{bad}").status_code == 404, bad
    for url in ("/gallery/..", "/gallery/../test.csv"):  # the client normalises these away from /gallery
        r = client.get(url)
        assert r.headers["content-type"] != "image/jpeg" and b"latitude,longitude" not in r.content


def _drop_three_photos(page, sample_root, tiny_engine, tmp_path):
    """Three photos of one sequence dropped on the page (a real drop event with their files): the joint
    answer the API gives for them, each photo's own answer and agreement, and the GeoJSON download."""
    import base64

    from fastapi.testclient import TestClient

    from retrieve.app import create_app
    from retrieve.engine import Engine

    paths = _sequence_images(sample_root)
    files = [{"name": p.name, "b64": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, { type: "image/jpeg" }));
        }
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
    }""", files)
    page.wait_for_selector("#together", timeout=30_000)
    with TestClient(create_app(Engine(tiny_engine / "index")), base_url="http://127.0.0.1") as client:
        want = client.post("/locate", files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
                           data={"together": "true"}).json()
    lat, lon = (float(v) for v in page.text_content("#coords").split(","))
    assert (lat, lon) == pytest.approx((want["latitude"], want["longitude"]), abs=1e-4)
    assert "3 photos together" in page.text_content("#together")
    assert page.locator(".marker.photo").count() == 3 and page.locator(".photo-row").count() == 3
    assert page.locator(".marker.answer").count() == 1 and page.locator(".marker.radius").count() == 1
    assert page.evaluate("window.geovote.circle.getRadius()") == pytest.approx(1000 * want["radius_km"])
    agreement = [row.locator("td").nth(3).text_content() for row in page.locator(".photo-row").all()]
    assert agreement == [f"{100 * p['agreement']:.0f}%" for p in want["photos"]]
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "answer.geojson"
    info.value.save_as(saved)
    fc = json.loads(saved.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 1
    feature = fc["features"][0]
    assert feature["geometry"] == {"type": "Point", "coordinates": [want["longitude"], want["latitude"]]}
    assert feature["properties"]["images"] == [p.name for p in paths]
    assert feature["properties"]["within_km"] == want["within_km"]
