"""One vocabulary of options (the table in orestudy/commands/cli.py's docstring): every command's options
listed, a concept has one name in all of them and a name one meaning; old spellings still work, with a
deprecation line; --device is checked; a mistyped command or option is answered with the closest one."""
from __future__ import annotations

import argparse
import re

import pytest
from test_cli import face_parser

from orestudy.commands import cli
from orestudy.config import TrainConfig

COMMANDS = list(cli.COMMANDS)

# Second names a concept must not have: its vocabulary name, then spellings that name the same thing
# (those of earlier versions first). A command offering one of them as a live option fails.
SYNONYMS = {
    "--runs": ("--mlflow-dir", "--mlflow-store", "--store", "--tracking-uri", "--mlruns", "--project"),
    "--output": ("--out", "--output-dir", "--out-dir", "--save-dir", "--results"),
    "--image-size": ("--input-size", "--img-size", "--imgsz", "--size", "--resolution"),
    "--coverage": ("--set-coverage", "--conformal-coverage"),
    "--target-error": ("--unknown-target-error", "--error-target", "--max-error"),
    "--delta": ("--unknown-delta", "--confidence"),
    "--seeds": ("--seed-list", "--split-seeds"),
    "--device": ("--gpu", "--cuda", "--accelerator"),
    "--threads": ("--workers", "--num-threads", "--jobs"),
    "--batch-size": ("--batch", "--bs"),
    "--experiment": ("--experiment-name", "--mlflow-experiment"),
    "--data": ("--data-dir", "--images", "--dataset"),
    "--model": ("--weights", "--checkpoint", "--run"),
}

# The old spellings kept for one release: (commands, old, new, a value).
DEPRECATED = [
    (("train", "replicate", "search"), "--output", "--runs", "somewhere"),
    (("train",), "--unknown-target-error", "--target-error", "0.02"),
    (("train",), "--unknown-delta", "--delta", "0.05"),
    (("train",), "--set-coverage", "--coverage", "0.9"),
    (("eda",), "--input-size", "--image-size", "64"),
]

# A name shared by commands whose arguments differ, and why it still means one thing.
SAME_MEANING_OTHER_ARGUMENT = {
    "--resume": "continue the interrupted run (train: its folder) or study (replicate, search: of its --name)",
    "--tta": "flip test-time augmentation: train chooses it for the run (off, flips, auto), predict overrides "
             "the run's choice (--tta / --no-tta)",
}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {}
    with pytest.MonkeyPatch.context() as mp:
        for command in COMMANDS:
            found[command] = face_parser(command, mp)
            mp.undo()
    return found


def live(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A parser's options by name: no help, no --no-X of a flag, no deprecated spelling."""
    return {s: a for a in parser._actions for s in a.option_strings  # argparse keeps no public list
            if not isinstance(a, (argparse._HelpAction, cli.Deprecated)) and not (
                s.startswith("--no-") and isinstance(a, argparse.BooleanOptionalAction))}


def kind(action: argparse.Action) -> tuple:
    """What an option takes: a flag, a list of what, one value of what type (a path is text)."""
    if isinstance(action, cli.ListAction):
        return "list", action.type_of.__name__
    if action.nargs == 0:
        return ("flag",)
    name = getattr(action.type, "__name__", "str")
    return ("many" if isinstance(action, argparse._AppendAction) else "one",
            "str" if name in ("str", "Path", "PosixPath", "WindowsPath") else name)


def vocabulary_names() -> set[str]:
    text = cli.__doc__.split("Old spellings")[0]
    return {f"--{name}{s}" for name, plural in re.findall(r"--([a-z][a-z-]*[a-z])(\(s\))?", text)
            for s in ("", "s" if plural else "")}


def test_every_command_is_listed_and_a_shared_name_is_in_the_vocabulary(parsers):
    uses: dict[str, list[str]] = {}
    for command, parser in parsers.items():
        for name in live(parser):
            uses.setdefault(name, []).append(command)
    assert set(parsers) == set(cli.COMMANDS) and len(uses) > 60
    shared = {name for name, commands in uses.items() if len(commands) > 1}
    assert {"--runs", "--output", "--device", "--seed", "--seeds", "--image-size"} <= shared
    missing = sorted(shared - vocabulary_names())
    assert not missing, f"options of several commands that cli.py's vocabulary table does not name: {missing}"


def test_no_concept_has_a_second_name(parsers):
    second = [f"orestudy {command} {name} (a second name for {word})" for command, parser in parsers.items()
              for name in live(parser) for word, others in SYNONYMS.items() if name in others]
    assert not second, "\n".join(second)


def test_a_shared_name_means_one_thing(parsers):
    kinds: dict[str, dict[tuple, list[str]]] = {}
    for command, parser in parsers.items():
        for name, action in live(parser).items():
            kinds.setdefault(name, {}).setdefault(kind(action), []).append(command)
    differ = {name: found for name, found in kinds.items() if len(found) > 1 and name not in SAME_MEANING_OTHER_ARGUMENT}
    assert not differ, differ


def test_the_mlflow_store_is_runs_and_output_is_never_it(parsers):
    for command, parser in parsers.items():
        options = live(parser)
        takes_uris = "--model" in options and "mlflow" in options["--model"].help.lower()
        if "--mlflow" in options or takes_uris:  # logs to MLflow, or resolves runs:/ URIs
            # runs, or (val, eda, audit) beside what the command writes or the model's own store, as its help says
            assert options["--runs"].default in ("runs", None), command
        for name, action in options.items():
            text = action.help.lower()
            if "mlflow.db" in text or "mlflow store" in text:
                assert name == "--runs", f"orestudy {command} {name}: {action.help}"
        if "--output" in options:
            assert options["--output"].default != "runs" and "mlflow" not in options["--output"].help.lower(), command
    assert "--output" not in live(parsers["train"]) and live(parsers["train"])["--runs"].dest == "output"


@pytest.mark.parametrize("commands, old, new, value", DEPRECATED)
def test_old_spellings_work_with_one_warning_line(parsers, capsys, commands, old, new, value):
    for command in commands:
        parser = parsers[command]
        positional = ["space"] if command == "search" else []
        expected = parser.parse_args([*positional, new, value])
        assert capsys.readouterr().err == ""
        assert parser.parse_args([*positional, old, value]) == expected
        assert capsys.readouterr().err == f"warning: {old} is deprecated; use {new}\n"
        assert old not in parser.format_help()  # hidden: the help shows one name
    table = cli.__doc__.split("Old spellings")[1]
    assert re.search(rf"{re.escape(old)}\s+{re.escape(new)}\n", table)


def test_every_old_spelling_is_in_the_table(parsers):
    found = {(command, a.option_strings[0], a.new.option_strings[0]) for command, parser in parsers.items()
             for a in parser._actions if isinstance(a, cli.Deprecated)}
    assert found == {(command, old, new) for commands, old, new, _ in DEPRECATED for command in commands}


def test_device_is_checked_in_every_command(parsers, capsys):
    having = [command for command, parser in parsers.items() if "--device" in live(parser)]
    assert {"train", "val", "predict", "replicate", "search"} <= set(having)
    for command in having:
        parser = parsers[command]
        positional = {"search": ["space"], "predict": ["x.png", "--model", "m"], "val": ["--model", "m", "--data", "d"]}
        argv = positional.get(command, [])
        for good in ("cpu", "cuda", "cuda:1", "auto"):
            assert parser.parse_args([*argv, "--device", good]).device == good
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--device", "gpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert "unknown device 'gpu'; expected cpu, cuda, cuda:N or auto" in err[-1], (command, err)
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        TrainConfig(device="cuda:x")


def test_a_mistyped_command_or_option_gets_did_you_mean(parsers, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["trian"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'trian'; did you mean 'train'?" in err
    with pytest.raises(SystemExit):
        cli.main(["zzz"])
    assert "invalid choice: 'zzz' (choose from train, val," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parsers["train"].parse_args(["--seeed", "3"])
    assert "unrecognized arguments: --seeed 3; did you mean '--seed'?" in capsys.readouterr().err


def test_train_takes_the_grid_row_names_replicate_takes(parsers, capsys):
    from orestudy.commands import train
    from orestudy.studies.grid import Cell

    parser = train.argument_parser()
    config = train.config_from(parser, parser.parse_args(["--regime", "tl_da_se"]))
    assert (config.regime, config.attention) == ("tl_da", "se")
    assert Cell("t", "mobilenet_v2", config.regime, config.attention, "frozen").row == "tl_da_se"
    config = train.config_from(parser, parser.parse_args(["--regime", "scratch_cbam"]))
    assert (config.regime, config.attention) == ("scratch", "cbam")
    assert train.config_from(parser, parser.parse_args(["--regime", "tl_da"])).attention == "se"  # the default
    with pytest.raises(SystemExit):
        train.config_from(parser, parser.parse_args(["--regime", "tl_da_se", "--attention", "none"]))
    assert "--regime tl_da_se is --regime tl_da --attention se" in capsys.readouterr().err
    assert "tl_da_se" in live(parsers["train"])["--regime"].help


def test_seeds_default_to_the_committed_studies_seeds_train_s_first(parsers):
    seeds = parsers["search"].get_default("seeds")
    assert seeds == [TrainConfig().seed, 1, 2, 3, 4]
    assert "231,1,2,3,4" in live(parsers["search"])["--seeds"].help


def test_a_default_that_stands_for_another_value_is_not_shown_as_it_is(parsers):
    """replicate --epochs 0 means the grid's 20: its help says so, not "default: 0"."""
    help_text = " ".join(parsers["replicate"].format_help().split())
    assert "the paper's 20" in help_text and "(default: 0)" not in help_text.split("--epochs")[1].split("--")[0]


def test_every_list_option_takes_both_syntaxes(parsers):
    for command, parser in parsers.items():
        for name, action in live(parser).items():
            if action.nargs in ("+", "*"):
                assert isinstance(action, cli.ListAction), f"orestudy {command} {name}"
