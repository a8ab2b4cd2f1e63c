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
