"""The README's main job end to end through main([...]), with the bundled default model."""
import json

from embed.build import main as embed_main
from embed.models import DEFAULT_MODEL_DIR, load_backbone
from retrieve.query import main as query_main


def test_the_bundled_model_is_there_and_loads():
    manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    assert manifest["name"] == "geovote-default" and manifest["weights_dtype"] == "float16"
    size_mb = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) / 2**20
    assert size_mb <= 10
    bb = load_backbone("default")
    assert bb.dim == 128 and bb.image_size == 64 and bb.name.startswith("geovote-default@")


def test_main_job_on_a_sample_then_a_query(sample_root, tmp_path, capsys):
    out = tmp_path / "engine"
    assert embed_main(["--data", str(sample_root), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "2,000 images embedded, 0 failed" in printed and "val: voting GeoScore" in printed
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    assert query_main([str(img), "--index", str(out / "index"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["image"] == str(img) and 0 <= answer["confidence"] <= 1


def test_embed_build_reports_a_bad_dataset(tmp_path, capsys):
    assert embed_main(["--data", str(tmp_path)]) == 2
    assert "no train.csv" in capsys.readouterr().err


def test_embed_build_refuses_an_unknown_model(sample_root, tmp_path, capsys):
    assert embed_main(["--data", str(sample_root), "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
