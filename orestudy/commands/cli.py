"""Command-line options generated from dataclass fields: their help, default and choices come from the
field metadata (config.option), so a new field is a new option with nothing else to write.

Hand-written over argparse rather than tyro or jsonargparse: about a hundred lines, no dependency, and
the faces stay importable without torch so that `--help` answers at once.

One vocabulary for every command: a concept has one option name, a name one meaning
(tests/test_vocabulary.py checks every command's options against it):

    --runs DIR          the runs folder: run and study folders, and the MLflow store DIR/mlflow.db (unless
                        MLFLOW_TRACKING_URI is set); default runs. train, replicate and search make runs
                        in it; val, predict, export, eda, audit and ensemble log to it and resolve
                        runs:/ and models:/ URIs from it
    --output PATH       what this command writes: its results folder (val, eda, audit, ensemble, compare,
                        answers), or its one file (predict, export); never the runs folder
    --name NAME         the folder of this run or study under --runs (and its MLflow run name)
    --data DIR          an image folder with one sub-folder per class
    --model RUN         a trained model: run folder, checkpoint, or MLflow URI (audit: a run folder)
    --image-size N      the model's input size in pixels
    --seed N            the seed of this command's randomness (train: split and training seed, 231)
    --seeds N,N,...     the seeds a study runs each configuration with, one run per seed
    --target-error E    the guaranteed "unknown": at most E error among answered photos ...
    --delta D           ... with confidence 1 - D
    --coverage C        prediction sets that hold the true class with probability C
    --sets G            the sets' guarantee: conditional (coverage >= C with confidence 1 - D over the
                        calibration draw) or marginal (>= C on average over calibrations)
    --device D          cpu, cuda, cuda:N or auto (CUDA when present); anything else is refused
    --tta               flip test-time augmentation: train chooses it for the run (off, flips, auto);
                        predict overrides the run's choice (--tta, --no-tta)
    --resume            continue the interrupted run (train: RUN_DIR) or study (replicate, search: --name)
    --regime R          train takes a grid row's name too: --regime tl_da_se is --regime tl_da
                        --attention se, the row replicate --regimes tl_da_se runs
    --precision, --threads, --batch-size, --cache, --curation, --mlflow, --experiment, --backbone(s),
    --folds, --epochs, --reuse; a study's (replicate, search) --storage-path, --max-failures,
    --cpus-per-trial, --gpus-per-trial, --address: one meaning wherever they appear

Old spellings still work for one release, each with a line `warning: --old is deprecated; use --new`
on stderr (RENAMED below and the faces' cli.deprecate):

    old                                       new
    train, replicate, search --output         --runs
    train --unknown-target-error              --target-error
    train --unknown-delta                     --delta
    train --set-coverage                      --coverage
    eda --input-size                          --image-size
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import typing
from dataclasses import MISSING, fields

from .. import config

# A field's option where it is not the field's own name: the field keeps its name (configs, records,
# grid and search-space YAML, --set), the option takes the vocabulary's; the field's own spelling
# stays accepted for one release, deprecated.
RENAMED = {"output": "--runs", "unknown_target_error": "--target-error", "unknown_delta": "--delta",
           "set_coverage": "--coverage"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every face's help: its description as written, every option's default after its help, but where
    the help says it (required options, empty defaults, whose help says what their absence means)."""

    def _get_help_string(self, action):  # ArgumentDefaultsHelpFormatter's one hook
        if action.required or action.default in (None, "", []) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """A face's parser: HelpFormatter, and a mistyped option answered with the closest one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            known = [s for a in self._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
            for word in message.removeprefix("unrecognized arguments: ").split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("--") else []
                if close:
                    message += f"; did you mean {close[0]!r}?"
                    break
        super().error(message)


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


def typed(parse):
    """An argparse type from a function that raises ValueError with a message: the message is the error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


device = typed(config.device_name)  # --device's type in the faces that write it by hand


class Deprecated(argparse.Action):
    """An option's old spelling: it does what the new one does, after a warning line on stderr."""

    def __init__(self, option_strings, dest, new: argparse.Action, **kwargs):
        super().__init__(option_strings, dest, nargs=new.nargs, default=argparse.SUPPRESS, type=new.type,
                         metavar=new.metavar, help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string.startswith("--no-") and len(self.new.option_strings) > 1
        use = self.new.option_strings[1 if negative else 0]
        print(f"warning: {option_string} is deprecated; use {use}", file=sys.stderr)
        self.new(parser, namespace, values, use)


def deprecate(container, old: str, new: argparse.Action) -> argparse.Action:
    """old (a hidden option of the parser or group container) as an alias of the action new."""
    return container.add_argument(old, action=Deprecated, new=new, dest=new.dest)


def field_default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def item_type(hint) -> type:
    """A list field's item type: int for tuple[int, ...] or list[int]."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return args[0] if args else str


def field_metadata(cls, name: str):
    return next(f.metadata for f in fields(cls) if f.name == name)


def add_options(parser, cls, exclude=(), group_titles: dict[str, str] | None = None,
                more_help: dict[str, str] | None = None, groups: dict | None = None) -> None:
    """One --option per field of the dataclass cls, typed from its default (or its metadata's parse),
    with its help, choices and metavar; a list field (a tuple or list default) takes `1,2,3` or `1 2 3`,
    or with repeat, one value per option. Fields whose metadata role has a title in group_titles go to
    a group of that title (or to the parser's group of that role in groups); more_help adds to a
    field's help. A field in RENAMED takes its vocabulary name, its own spelling deprecated. The
    parser's formatter_class=HelpFormatter shows the defaults."""
    groups = {**{role: parser.add_argument_group(title) for role, title in (group_titles or {}).items()},
              **(groups or {})}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        default, meta = field_default(f), f.metadata
        target = groups.get(meta.get("role"), parser)
        own = "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "default": default, "help": meta["help"] + (more_help or {}).get(f.name, "")}
        parse, metavar = meta.get("parse"), meta.get("metavar")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (list, tuple)):
            kind = parse or item_type(hints[f.name])
            kwargs["default"] = list(default)  # argparse appends to it; the dataclass gets its own type back
            if meta.get("repeat"):
                kwargs.update(action="append", type=typed(kind) if parse else kind)
            else:
                kwargs.update(nargs=meta.get("nargs") or "+", action=list_option(kind))
            if metavar:
                kwargs["metavar"] = metavar
        else:  # choices are checked by the dataclass, whose message names the field and the choices
            choices = meta.get("choices")
            kwargs["type"] = typed(parse) if parse else type(default)
            kwargs["metavar"] = metavar or ("{" + ",".join(map(str, choices)) + "}" if choices
                                            else type(default).__name__.upper())
        action = target.add_argument(RENAMED.get(f.name, own), **kwargs)
        if action.option_strings[0] != own:
            deprecate(target, own, action)


def option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """The option that sets dest (its vocabulary name, not a deprecated spelling)."""
    return next(a.option_strings[0] for a in parser._actions  # argparse keeps no public list of them
                if a.dest == dest and a.option_strings and not isinstance(a, Deprecated))


def from_args(args: argparse.Namespace, cls, **overrides):
    """cls from the parsed options of its fields (a tuple field gets a tuple), then overrides."""
    values = {}
    for f in fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(field_default(f), tuple) and isinstance(value, list) else value
    return cls(**{**values, **overrides})


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
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(f"argument COMMAND: invalid choice: {argv[0]!r}"
                     + (f"; did you mean {close[0]!r}?" if close else f" (choose from {', '.join(COMMANDS)})"))
    command = parser.parse_args(argv[:1]).command
    module = importlib.import_module(f"orestudy.commands.{command}")
    _through_command = True
    try:
        result = module.main(argv[1:])
    finally:
        _through_command = False
    return result if isinstance(result, int) and not isinstance(result, bool) else 0  # the exit status
