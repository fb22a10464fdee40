"""Command-line options generated from dataclass fields: their help, default and choices come from the
field metadata (config.option), so a new field is a new option with nothing else to write.

Hand-written over argparse rather than tyro or jsonargparse: about forty lines, no dependency, and
the faces stay importable without torch so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import MISSING, fields


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every face's help: its description as written, every option's default after its help, but where
    the help says it (required options, empty defaults, whose help says what their absence means)."""

    def _get_help_string(self, action):  # ArgumentDefaultsHelpFormatter's one hook
        if action.required or action.default in (None, "", []) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


class ListAction(argparse.Action):
    """A list option written either way, `--seeds 1,2,3` or `--seeds 1 2 3` (nargs="+")."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = [item for value in values for item in comma_list(value)]
        try:
            setattr(namespace, self.dest, [self.type_of(item) for item in items])
        except ValueError as err:
            parser.error(f"{option_string}: {err}")

    type_of = staticmethod(str)


def list_option(kind=str):
    return type(f"{kind.__name__.title()}ListAction", (ListAction,), {"type_of": staticmethod(kind)})


def field_default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def add_options(parser, cls, exclude=(), group_titles: dict[str, str] | None = None) -> None:
    """One --option per field of the dataclass cls, typed from its default, with its help and choices;
    fields whose metadata role has a title in group_titles go to a group of that title. The parser's
    formatter_class=HelpFormatter shows the defaults."""
    groups = {role: parser.add_argument_group(title) for role, title in (group_titles or {}).items()}
    for f in fields(cls):
        if f.name in exclude:
            continue
        default = field_default(f)
        meta = f.metadata
        target = groups.get(meta.get("role"), parser)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        else:  # choices are checked by the dataclass, whose message names the field and the choices
            choices = meta.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else type(default).__name__.upper()
            target.add_argument(flag, type=type(default), default=default, metavar=metavar, help=meta["help"])


def from_args(args: argparse.Namespace, cls, **overrides):
    return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **overrides})


# ---------------------------------------------------------------------------------------------------
# The `orestudy` command: one subcommand per face, each face imported only when its command runs

COMMANDS = {
    "train": "train one configuration and test it once",
    "val": "evaluate a trained model on any folder of class sub-folders",
    "predict": "classify photos with a trained model",
    "serve": "a local web page to ask a model about photos (answers, sets, similar photos, heat maps)",
    "export": "write a trained model as ONNX or TorchScript, its preprocessing in a JSON beside it",
    "eda": "the data set: class counts, sizes, colours, near-duplicates",
    "replicate": "the paper's grid as a Ray Tune study",
    "search": "a hyper-parameter search (Optuna through Ray Tune)",
    "compare": "the paired effects table of trial records",
    "audit": "find suspect labels: out-of-fold probabilities and confident learning (cleanlab)",
    "answers": "the guaranteed 'unknown' and prediction sets, checked from trial records",
    "ensemble": "combine runs of one split, weights chosen on validation, the test split scored once",
}
_through_command = False  # set by main: faces then call themselves `orestudy SUB` in their usage lines


def prog(command: str) -> str:
    """A face's name in its usage line: how it was called."""
    return f"orestudy {command}" if _through_command else f"python -m orestudy.{command}"


def main(argv: list[str] | None = None) -> int:
    """`orestudy COMMAND [options]`: the console script (and `python -m orestudy`)."""
    global _through_command
    argv = sys.argv[1:] if argv is None else list(argv)
    width = max(map(len, COMMANDS))
    parser = argparse.ArgumentParser(
        prog="orestudy", usage="%(prog)s [-h] COMMAND [OPTIONS ...]", formatter_class=HelpFormatter,
        description="Train and study image classifiers of ore-mineral photos.",
        epilog="commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
               + "\n\n`orestudy COMMAND --help` lists a command's options; `python -m orestudy.COMMAND` is the same.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    command = parser.parse_args(argv[:1]).command
    module = importlib.import_module(f"orestudy.commands.{command}")
    _through_command = True
    try:
        result = module.main(argv[1:])
    finally:
        _through_command = False
    return result if isinstance(result, int) and not isinstance(result, bool) else 0  # the exit status
