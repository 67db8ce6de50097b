from dataclasses import dataclass
from pathlib import Path

import pytest

from geovote.config import ConfigError, load_config, parse_override
from geovote.sample import main as sample_main


@dataclass
class Demo:
    k: int = 50
    temperature: float = 0.05
    cells: str = "h3"
    levels: tuple[int, ...] = (1, 2, 3)
    refine: bool = True


def test_defaults_file_then_overrides(tmp_path):
    assert load_config(Demo) == Demo()
    (tmp_path / "c.toml").write_text('k = 10\ncells = "quadtree"\nlevels = [2, 4]\n')
    cfg = load_config(Demo, tmp_path / "c.toml", ["k=20", "temperature=1", "refine=false"])
    assert cfg == Demo(k=20, temperature=1.0, cells="quadtree", levels=(2, 4), refine=False)
    assert parse_override("cells=quadtree") == ("cells", "quadtree")


@pytest.mark.parametrize("overrides, message", [
    (["kk=3"], "unknown key 'kk'"),
    (["k=3.5"], "Demo.k: expected int"),
    (["refine=1"], "Demo.refine: expected bool"),
    (["levels=[1, 'a']"], "Demo.levels: expected int"),
    (["k"], "expected key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Demo, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(Demo, tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("k = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Demo, tmp_path / "bad.toml")


def test_sample_command_takes_the_shipped_config_and_overrides(tmp_path, capsys):
    assert sample_main(["--out", str(tmp_path / "s"), "--config", str(Path(__file__).resolve().parents[1] / "configs" / "sample.toml"),
                        "--set", "n_train=120", "--set", "n_val=10", "--set", "n_test=10"]) == 0
    assert len((tmp_path / "s" / "train.csv").read_text().splitlines()) == 121
    assert sample_main(["--out", str(tmp_path / "t"), "--set", "n_test=0"]) == 2
    assert "n_test must be at least 1" in capsys.readouterr().err
