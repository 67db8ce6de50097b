"""Engines people can share (retrieve.share): the published folder (only what queries read, hashed, no
path of this machine, a card the hub parses), answered from a hub cache laid out as huggingface_hub lays
it out with HF_HUB_OFFLINE=1 (the same answers, to the bit), a corrupted file refused by name, and the
`geovote` command."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.share_bench import as_hub_cache
from geovote.console import SUBCOMMANDS
from geovote.console import main as geovote_main
from retrieve.publish import main as publish_main
from retrieve.query import main as query_main

ROOT = Path(__file__).resolve().parents[1]
REPO = "geovote-test/sample-engine"
REVISION = "a" * 40


@pytest.fixture(scope="module")
def published(tiny_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("published") / "engine"
    assert publish_main([str(tiny_engine), "--to", str(out)]) == 0
    return out


def test_the_folder_holds_what_queries_read_hashed_and_nothing_of_this_machine(published, tiny_engine,
                                                                             tiny_model, sample_root):
    record = json.loads((published / "engine.json").read_text())
    files = set(record["files"])
    on_disk = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert on_disk == files | {"engine.json", "README.md"}
    index = {f for f in files if f.startswith("index/")}
    assert {"index/index.json", "index/index.faiss", "index/refine.faiss", "index/ids.npy", "index/latitude.npy",
            "index/longitude.npy", "index/retrieve.json", "index/calibration.json",
            "index/calibration-albums.json"} <= index
    assert not any(f.startswith("embeddings") or "predictions" in f for f in files)
    for name, want in record["files"].items():
        data = (published / name).read_bytes()
        assert len(data) == want["bytes"] and hashlib.sha256(data).hexdigest() == want["sha256"]
    # the tiny model is a checkpoint folder: its weights travel inside the engine
    assert record["model"] == {"name": "model", "source": "engine folder"}
    assert sorted(p.name for p in (published / "model").iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    # no path of the publisher's machine in any text file
    for f in published.rglob("*.json"):
        text = f.read_text()
        for path in (str(tiny_engine), str(sample_root), str(tiny_model), str(Path.home())):
            assert path not in text, (f, path)
    # the caches follow the scrubbed index.json they belong to (its digest)
    from index.search import current_digest

    digest = current_digest(published / "index")
    caches = [f for f in index if f.startswith(("index/cells-", "index/countries-", "index/spacing-"))]
    assert caches and all(f.endswith(f"-{digest}.npy") for f in caches)
    # nothing is overwritten
    assert publish_main([str(tiny_engine), "--to", str(published)]) == 2


def test_the_card_is_read_by_huggingface_hub(published):
    from huggingface_hub import ModelCard

    card = ModelCard((published / "README.md").read_text())
    assert card.data.license == "cc-by-4.0"  # the sample's data (GeoNames places)
    assert card.data.library_name == "geovote" and "geolocation" in card.data.tags
    assert "hf-hub:ORG/NAME" in card.text and "| tuned on | val" in card.text


def _query(args: list[str], home: Path, verified: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "GEOVOTE_CACHE": str(verified),
           "GEOVOTE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "retrieve.query", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_answers_from_the_hub_cache_offline_equal_the_local_engines(published, tiny_engine, sample_root,
                                                                    tmp_path, capsys):
    home = tmp_path / "hf"
    base = as_hub_cache(published, home, REPO, REVISION)
    imgs = [str(p) for p in sorted((sample_root / "images" / "test").rglob("*.jpg"))[:4]]
    assert query_main([*imgs, "--index", str(tiny_engine / "index"), "--json"]) == 0
    local = capsys.readouterr().out
    got = _query([*imgs, "--index", f"hf-hub:{REPO}", "--json"], home, tmp_path / "verified")
    assert got.returncode == 0, got.stderr
    assert got.stdout == local  # bit for bit: coordinates, probabilities, candidates, places
    # its evidence: the gallery images' ids and places, no file of this machine
    got = _query([imgs[0], "--index", f"hf-hub:{REPO}", "--json", "--evidence", "2"], home, tmp_path / "verified")
    evidence = json.loads(got.stdout)["evidence"]
    assert len(evidence) == 2 and all(e["path"] == "" and "a published engine" in e["note"] for e in evidence)
    # the same album answer together
    assert query_main([*imgs, "--together", "--json", "--index", str(tiny_engine / "index")]) == 0
    local = capsys.readouterr().out
    got = _query([*imgs, "--together", "--json", "--index", f"hf-hub:{REPO}@{REVISION}"], home, tmp_path / "v2")
    assert got.returncode == 0 and got.stdout == local
    # a corrupted file is refused, by name, even after an earlier check passed
    ids = base / "snapshots" / REVISION / "index" / "ids.npy"
    data = bytearray(ids.read_bytes())
    data[-1] ^= 0xFF
    ids.resolve().write_bytes(bytes(data))
    got = _query([imgs[0], "--index", f"hf-hub:{REPO}"], home, tmp_path / "verified")
    assert got.returncode == 2 and "index/ids.npy does not match its sha256 in engine.json" in got.stderr
    # a file missing from the cache, offline: said so
    (base / "snapshots" / REVISION / "index" / "ids.npy").unlink()
    got = _query([imgs[0], "--index", f"hf-hub:{REPO}"], home, tmp_path / "verified")
    assert got.returncode == 2 and "index/ids.npy is not in the hub cache" in got.stderr
    got = _query([imgs[0], "--index", "hf-hub:nobody"], home, tmp_path / "verified")
    assert got.returncode == 2 and "hf-hub:ORG/NAME[@REVISION]" in got.stderr


def test_the_geovote_command_runs_the_modules_mains(tiny_engine, sample_root, capsys):
    img = str(sorted((sample_root / "images" / "test").rglob("*.jpg"))[0])
    assert query_main([img, "--index", str(tiny_engine / "index"), "--json"]) == 0
    want = capsys.readouterr().out
    assert geovote_main(["locate", img, "--index", str(tiny_engine / "index"), "--json"]) == 0
    assert capsys.readouterr().out == want
    assert geovote_main(["nonsense"]) == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
    assert geovote_main([]) == 2 and "commands:" in capsys.readouterr().out
    assert {"build", "locate", "serve", "bench", "publish"} <= set(SUBCOMMANDS)
    import importlib

    for module, _ in SUBCOMMANDS.values():  # every subcommand is a module with main(argv)
        assert callable(importlib.import_module(module).main)
    # the console script scripts/setup.sh installs ([project.scripts]) is this dispatcher
    script = shutil.which("geovote", path=str(Path(sys.executable).parent))
    assert script, "no geovote console script beside this python: reinstall with pip install -e ."
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "publish" in done.stdout
