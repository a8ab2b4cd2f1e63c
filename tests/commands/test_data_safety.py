"""Bad input through the CLI: one line on stderr, exit 2, and nothing outside the output folder
changed. Above all, no diffq command may delete or replace a folder diffq did not write."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from diffq import cli
from diffq.io import OUTPUT_MARKER

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("DIFFQ_TEST_PIPELINE", ROOT / "samples" / "tiny-sd"))
FAST = ["--steps", "4", "--batch-size", "2", "--no-progress", "--num-prompts", "2"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder below `root` (hidden ones too) with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_exit_2(capsys, *args) -> str:
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    return err


@pytest.fixture
def users_folder(tmp_path):
    """A folder of someone's work: never ours to replace."""
    home = tmp_path / "thesis"
    (home / "sub").mkdir(parents=True)
    (home / "thesis.txt").write_text("chapter 1")
    (home / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return home


def test_overwrite_refuses_a_folder_diffq_did_not_write(capsys, tmp_path, users_folder):
    before = snapshot(tmp_path)
    for command in ("calibrate", "eval", "compare"):
        err = one_line_exit_2(capsys, command, "--model", MODEL, "--out", users_folder,
                              "--overwrite", *FAST[:5])
        assert "was not written by diffq" in err and OUTPUT_MARKER in err
    assert snapshot(tmp_path) == before


def test_out_may_not_be_a_file_the_cwd_its_parent_or_an_input(capsys, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    prompts = tmp_path / "p" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a red circle\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    cases = [
        (["--out", afile, "--overwrite"], "is a file"),
        (["--out", ".", "--overwrite"], "is the current directory or holds it"),
        (["--out", "..", "--overwrite"], "is the current directory or holds it"),
        (["--out", model, "--overwrite"], "holds the input"),
        (["--out", prompts.parent, "--overwrite"], "holds the input"),
    ]
    for extra, needle in cases:
        err = one_line_exit_2(capsys, "calibrate", "--model", model, "--prompts", prompts, *FAST,
                              *extra)
        assert needle in err, (extra, err)
    assert snapshot(tmp_path) == before  # no hidden .old-, .partial- or cache folder either


def test_overwrite_replaces_what_diffq_wrote(tmp_path, capsys):
    out = tmp_path / "q"
    args = ["calibrate", "--model", MODEL, "--recipe", "w8", *FAST, "--out", out]
    assert cli.main([str(a) for a in args]) == 0
    assert (out / OUTPUT_MARKER).is_file()
    one_line_exit_2(capsys, *args)  # exists, no --overwrite
    assert cli.main([str(a) for a in [*args, "--overwrite"]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no leftovers beside it


def test_messages_say_what_is_true(capsys, tmp_path):
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"\0" * 16)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nweights:\n  format: int8\n   bits: [8\n")
    out = tmp_path / "out"
    cases = [
        (["calibrate", "--model", tmp_path / "missing"], "does not exist"),
        (["calibrate", "--model", MODEL, "--prompts", prompts_dir], "is a directory, not a file"),
        (["eval", "--model", MODEL, "--quantized", afile], "is a file, not a quantized directory"),
        (["calibrate", "--model", MODEL, "--recipe", bad_yaml], "not valid YAML at line 4"),
        (["calibrate", "--model", MODEL, "--guidance", "nan"], "--guidance must be a finite number"),
        (["eval", "--model", MODEL, "--guidance", "inf"], "--guidance must be a finite number"),
    ]
    before = snapshot(tmp_path)
    for args, needle in cases:
        err = one_line_exit_2(capsys, *args, "--out", out)
        assert needle in err, (args, err)
    assert snapshot(tmp_path) == before


def test_a_skip_pattern_that_matches_nothing_is_noted(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w8-skip\nweights: {format: int8}\nskip: [no_such_layer.*]\n")
    assert cli.main([str(a) for a in ["calibrate", "--model", MODEL, "--recipe", recipe, *FAST,
                                      "--out", tmp_path / "q"]]) == 0
    err = capsys.readouterr().err
    assert "note: recipe pattern 'no_such_layer.*' matched no layer of the unet" in err


def test_every_option_says_its_default(capsys):
    for command in ("calibrate", "eval", "compare", "bench"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
        wanted = ("--repeats", "--warmup", "--layers") if command == "bench" else (
            "--steps", "--guidance", "--seed", "--batch-size", "--out")
        for option in wanted:
            metavar = option.removeprefix("--").replace("-", "_").upper()
            entry = options.split(f"{option} {metavar} ", 1)[1].split(" --", 1)[0]
            assert "(default: " in entry, (command, option, entry)
        assert command == "bench" or "--no-progress no progress bars" in options


def test_an_optional_feature_without_its_extra_fails_before_any_work(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real(name, *a))
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"\0")
    before = snapshot(tmp_path)
    err = one_line_exit_2(capsys, "eval", "--model", MODEL, "--clip-model", tmp_path,
                          "--inception-weights", weights, "--out", tmp_path / "out")
    assert "needs the 'fid' extra: pip install 'diffq-toolkit[fid]'" in err
    assert snapshot(tmp_path) == before
