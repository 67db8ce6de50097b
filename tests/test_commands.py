"""The commands end to end through main([...])."""
from embed.build import main as embed_main


def test_embed_build_prepares_the_dataset_and_says_where_it_stops(sample_root, capsys):
    assert embed_main(["--data", str(sample_root)]) == 0
    out = capsys.readouterr().out
    assert "2,000 rows, 2,000 valid, 0 rejected" in out
    assert "not built yet" in out


def test_embed_build_reports_a_bad_dataset(tmp_path, capsys):
    assert embed_main(["--data", str(tmp_path)]) == 2
    assert "no train.csv" in capsys.readouterr().err
