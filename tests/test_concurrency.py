"""Two writers on one engine, and an engine that outlives its index (issue 25, items 1 and 2).

Two `embed.build` updates of one gallery started 0 s and 1 s apart must end, every time, with an engine
equal to a fresh build of the gallery (or with one run refused, naming the other); a server opened
before an update must answer from the new index afterwards and never leave its old tables behind for
later processes to trust."""
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_hostile import _gps, _save

ROOT = Path(__file__).resolve().parents[1]


def _gallery(sample_root, folder: Path, rows: list[dict], first: int = 0) -> None:
    for i, r in enumerate(rows, first):
        src = next((sample_root / "images" / "train").rglob(f"{r['id']}.jpg"))
        _save(folder / f"trip{i % 4}" / f"p{i:04d}.jpg", src, _gps(float(r["latitude"]), float(r["longitude"])))


def _cmd(photos, model, out, *extra):
    return [sys.executable, "-m", "embed.build", "--photos", str(photos), "--model", str(model), "--out",
            str(out), "--workers", "0", "--set", "tune=false", "--set", "index_factory=Flat", *extra]


def _vectors(folder: Path) -> dict:
    from geovote.shards import read_embeddings

    s = read_embeddings(folder, dtype=np.float16)
    return dict(zip(s.ids.astype(str), s.embedding))


@pytest.fixture(scope="module")
def galleries(sample_root, tiny_model, tmp_path_factory):
    """(the gallery folder, updated; an engine built before the update; a fresh build after it)"""
    base = tmp_path_factory.mktemp("concurrency")
    with open(sample_root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:160]
    photos = base / "photos"
    _gallery(sample_root, photos, rows[:80])
    engine = base / "engine"
    subprocess.run(_cmd(photos, tiny_model, engine), cwd=ROOT, check=True, capture_output=True, timeout=300)
    for i in range(40):  # 40 removed, 80 added: the kept photos all change rows
        (photos / f"trip{i % 4}" / f"p{i:04d}.jpg").unlink()
    _gallery(sample_root, photos, rows[80:160], 80)
    fresh = base / "fresh"
    subprocess.run(_cmd(photos, tiny_model, fresh), cwd=ROOT, check=True, capture_output=True, timeout=300)
    return photos, engine, fresh


@pytest.mark.slow
@pytest.mark.parametrize("offset_s", [0.0, 1.0])
def test_two_updates_at_once_end_equal_to_a_fresh_build_or_one_is_refused(galleries, tiny_model, tmp_path,
                                                                          offset_s):
    photos, engine, fresh = galleries
    want = _vectors(fresh / "embeddings" / "train")
    refused = 0
    for trial in range(5):
        out = tmp_path / f"engine{trial}"
        shutil.copytree(engine, out, symlinks=True)
        # slowed so that the runs overlap: 80 photos to embed in batches of 8, 0.3 s after each
        cmd = _cmd(photos, tiny_model, out, "--batch-size", "8", "--set", "pause_s=0.3")
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(offset_s)
        second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = [(p.wait(timeout=300), *p.communicate()) for p in (first, second)]
        for rc, _, err in results:
            assert "Traceback" not in err, err[-3000:]
            assert rc == 0 or (rc == 2 and "is being written by another run: pid" in err), err[-3000:]
        assert sum(rc == 0 for rc, _, _ in results) >= 1
        refused += sum(rc == 2 for rc, _, _ in results)
        got = _vectors(out / "embeddings" / "train")
        assert sorted(got) == sorted(want), f"trial {trial}"
        for image_id, vec in got.items():
            np.testing.assert_allclose(vec, want[image_id], atol=2e-3, err_msg=f"trial {trial}: {image_id}")
        from index.search import GeoIndex

        index, rebuilt = GeoIndex(out / "index"), GeoIndex(fresh / "index")
        ids = np.char.decode(np.asarray(index.ids), "utf-8")
        assert sorted(ids) == sorted(want)  # the index holds the update's photos, no others
        queries = np.stack([want[i] for i in sorted(want)]).astype(np.float32)
        np.testing.assert_array_equal(index.search(queries, k=5).ids, rebuilt.search(queries, k=5).ids)
    assert refused >= 1  # the runs did overlap: this tested two writers, not two runs in a row


def test_a_stale_lock_of_a_killed_run_is_said_and_taken_over(galleries, tiny_model, tmp_path):
    photos, engine, _ = galleries
    out = tmp_path / "engine"
    shutil.copytree(engine, out, symlinks=True)
    cmd = _cmd(photos, tiny_model, out, "--batch-size", "8", "--set", "pause_s=0.2")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / ".geovote.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    holder = lock.read_text()
    assert f"pid {proc.pid} " in holder
    proc.kill()
    proc.wait()
    r = subprocess.run(_cmd(photos, tiny_model, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"stopped without finishing ({holder.strip()}); its lock was stale" in r.stdout
    assert lock.read_text() == ""  # released cleanly


def test_an_engine_opened_before_an_update_takes_up_the_new_index_and_leaves_no_stale_cache(
        sample_root, tiny_model, tmp_path):
    """The server's engine is opened on gallery A; the index is then rebuilt for gallery B, whose rows
    lie elsewhere. The old engine's tables (countries, cells, spacing) must never be read by a process
    opening B, and the old engine itself answers from B once it refreshes."""
    from geovote.geo import spacing_km
    from retrieve.engine import Engine
    from retrieve.predict import SPACING_NEIGHBOURS, cell_table
    from retrieve.region import country_codes

    with open(sample_root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    photos = tmp_path / "photos"
    _gallery(sample_root, photos, rows[:60])
    out = tmp_path / "engine"
    assert subprocess.run(_cmd(photos, tiny_model, out), cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    server = Engine(out / "index", load_model=False)
    served = Engine(out / "index", load_model=False)  # behind a live app
    shutil.rmtree(photos)
    _gallery(sample_root, photos, rows[300:360], 300)  # as many rows, other places: every shape matches
    assert subprocess.run(_cmd(photos, tiny_model, out), cwd=ROOT, capture_output=True, timeout=300).returncode == 0

    old_lat = np.asarray(server.index.lat).copy()
    server.countries(), server.cells(), server.spacing()  # computed from the old, still mapped index

    later = Engine(out / "index", load_model=False)  # a process started after the update
    lat, lon = np.asarray(later.index.lat), np.asarray(later.index.lon)
    assert not np.array_equal(lat, old_lat)  # another gallery of the same size
    want = np.char.encode(country_codes(lat, lon).astype(str), "ascii")
    np.testing.assert_array_equal(np.asarray(later.countries()), want)
    np.testing.assert_array_equal(np.asarray(later.cells()), cell_table(lat, lon, later.params))
    np.testing.assert_array_equal(np.asarray(later.spacing()), spacing_km(lat, lon, SPACING_NEIGHBOURS))

    assert server.refresh() is True  # the old engine takes up the new index
    np.testing.assert_array_equal(np.asarray(server.countries()), want)
    assert server.refresh() is False

    from fastapi.testclient import TestClient

    from retrieve.app import create_app

    health = TestClient(create_app(served, log=lambda _: None), base_url="http://127.0.0.1").get("/health").json()
    assert health["ready"] and health["images"] == 60  # the app refreshed before answering
    np.testing.assert_array_equal(np.asarray(served.index.lat), lat)


def test_an_engine_takes_up_tuning_written_after_it_opened(tiny_engine, tmp_path):
    """A rebuild replaces the index folder without its tuning, which the tuning stage writes later, and
    `retrieve.tune` rewrites it alone: a long-running engine follows both, never stuck uncalibrated."""
    from retrieve.engine import Engine, load_params
    from retrieve.predict import VoteConfig

    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    index = out / "index"
    server = Engine(index, load_model=False)
    assert server.calibration is not None
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("retrieve.json", "calibration.json"):
        (index / name).rename(kept / name)  # as after a rebuild, before its tuning
    assert server.refresh() is True and server.calibration is None and server.params == VoteConfig()
    for name in ("calibration.json", "retrieve.json"):  # in tuning's own order
        shutil.copy(kept / name, index / name)
    assert server.refresh() is True
    assert server.calibration is not None and server.params == load_params(index / "retrieve.json")
    assert server.refresh() is False
