import os
import subprocess
import sys

from diffq import cli


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "diffq.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("calibrate", "eval", "compare", "bench"):
        assert cmd in out.stdout


def test_user_error_is_one_line_exit_2(capsys, monkeypatch):
    from diffq.errors import InputError

    def fail(_args):
        raise InputError("prompt file p.txt is empty")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["bench"].set_defaults(func=fail)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "diffq bench: error: prompt file p.txt is empty"


def test_commands_quiet_the_libraries_only_while_they_run(monkeypatch):
    """An in-process main() must not leave TRANSFORMERS/DIFFUSERS_VERBOSITY set in its host."""
    seen = {}

    def record(_args):
        seen.update({k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")})
        return 0

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["bench"].set_defaults(func=record)
    assert cli.main(["bench"]) == 0
    assert seen == {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "info"}
    assert "TRANSFORMERS_VERBOSITY" not in os.environ
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"


def test_a_foreign_diffq_package_is_named_in_one_line(capsys, monkeypatch):
    """The PyPI 'diffq' (another project) installs the same import name: say so, exit 2."""
    import diffq

    monkeypatch.delattr(diffq, "__distribution__")
    assert cli.main(["calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffq: error: 'import diffq' loads")
    assert "pip install --force-reinstall diffq-toolkit" in err
