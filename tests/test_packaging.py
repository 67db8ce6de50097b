"""What a non-editable install gets: the wheel carries the bundled model and the web page's files."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_bundled_model_and_the_page(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    src = tmp_path / "src"
    ignore = ("data", "runs", "build", "dist", ".venv", ".git", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*ignore))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("geovote-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("manifest.json", "visual.pt", "history.json"):
        assert f"embed/default_model/{f}" in names, sorted(n for n in names if n.startswith("embed/"))
    assert {"retrieve/static/index.html", "retrieve/static/app.js"} <= names
    # the files are the checkout's, byte for byte
    with zipfile.ZipFile(wheel) as z:
        assert z.read("embed/default_model/visual.pt") == (ROOT / "embed/default_model/visual.pt").read_bytes()
