"""The embedded default is found in an installed package or a source checkout, or named as
missing in one line."""
import pytest

from diffq import assets, cli


def test_shipped_prefers_the_installed_copy(tmp_path, monkeypatch):
    installed, source = tmp_path / "pkg" / "_samples", tmp_path / "src" / "samples"
    for root, name in ((installed, "tiny_sd"), (source, "tiny-sd")):
        (root / name).mkdir(parents=True)
        (root / name / "model_index.json").write_text("{}")
    monkeypatch.setattr(assets, "_PACKAGED", installed)
    monkeypatch.setattr(assets, "_SOURCE", source)
    assert assets.shipped("tiny-sd") == installed / "tiny_sd"
    (installed / "tiny_sd" / "model_index.json").unlink()
    assert assets.shipped("tiny-sd") == source / "tiny-sd"


def test_the_source_checkout_has_every_default():
    for name, marker in assets._MARKERS.items():
        assert (assets.shipped(name) / marker).is_file(), name


def test_missing_embedded_default_says_how_to_name_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "_PACKAGED", tmp_path / "none" / "_samples")
    monkeypatch.setattr(assets, "_SOURCE", tmp_path / "none" / "samples")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "embedded default model directory" in err and "--model DIR" in err
    assert not (tmp_path / "out").exists()


def test_missing_user_path_is_not_called_a_bad_pipeline(tmp_path):
    with pytest.raises(Exception, match=r"model directory .*nope does not exist"):
        from diffq.integrations.pipeline import check_pipeline_dir

        check_pipeline_dir(tmp_path / "nope")
