"""The `orestudy` command: every subcommand reachable, its help complete and fast."""
import argparse
import subprocess
import sys
import time

import pytest

from orestudy.commands import cli

HEAVY = ("torch", "ray", "mlflow", "optuna", "matplotlib", "sklearn", "pandas")
COMMANDS = list(cli.COMMANDS)


class Captured(Exception):
    pass


def face_parser(command, monkeypatch) -> argparse.ArgumentParser:
    """The parser `orestudy COMMAND` builds, caught as it parses (nothing runs)."""
    parse = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        if self.prog == "orestudy":
            return parse(self, args, namespace)
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Captured) as caught:
        cli.main([command])
    return caught.value.args[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_its_default_shown(command, monkeypatch):
    parser = face_parser(command, monkeypatch)
    assert parser.prog == f"orestudy {command}"
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        if not isinstance(action, argparse._HelpAction):
            assert action.help and action.help.strip(), f"orestudy {command} {action.option_strings or action.dest}"
    text = parser.format_help()
    for action in parser._actions:
        if action.choices and not isinstance(action.choices, dict):
            assert "{" + ",".join(map(str, action.choices)) + "}" in text  # choices shown


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_fast_and_imports_nothing_heavy(command):
    """Heavy libraries are the reason --help would be slow, and their absence does not depend on how
    busy the machine is; the wall time is checked too, best of three (CI machines are shared)."""
    probe = (f"import sys\nfrom orestudy.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
             f"except SystemExit:\n    pass\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert f"usage: orestudy {command}" in out and out.strip().endswith("[]"), out[-300:]
    seconds, bare = [], []
    for _ in range(3):
        seconds.append(wall([sys.executable, "-m", "orestudy", command, "--help"]))
        bare.append(wall([sys.executable, "-c", "import argparse"]))
        if seconds[-1] < 2:
            break
    # Under 2 s; on a machine so loaded that Python itself starts slowly, under 10 bare start-ups
    # (a --help importing torch takes some 50 of them).
    assert min(seconds) < max(2.0, 10 * min(bare)), (seconds, bare)


def wall(argv) -> float:
    started = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - started


def test_top_level_help_lists_every_command():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orestudy", "--help"], capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - started < 5  # one Python start-up, argparse and nothing else
    for command in cli.COMMANDS:
        assert f"\n  {command} " in out


def test_unknown_command_and_faces_called_directly(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["tran"])
    assert exited.value.code == 2 and "invalid choice: 'tran'" in capsys.readouterr().err
    from orestudy.commands import compare

    with pytest.raises(SystemExit):
        compare.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m orestudy.compare")  # not through the command


def test_list_options_take_both_syntaxes(tmp_path, monkeypatch):
    parser = face_parser("replicate", monkeypatch)
    monkeypatch.undo()
    for argv in (["--seeds", "1,2,3"], ["--seeds", "1", "2", "3"], ["--seeds", "1,2", "3"]):
        assert parser.parse_args(argv).seeds == [1, 2, 3]
