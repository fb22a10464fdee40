"""Command-line options generated from dataclass fields: their help, default and choices come from the
field metadata (config.option), so a new field is a new option with nothing else to write.

Hand-written over argparse rather than tyro or jsonargparse: about forty lines, no dependency, and
the faces stay importable without torch so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


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
    fields whose metadata role has a title in group_titles go to a group of that title."""
    groups = {role: parser.add_argument_group(title) for role, title in (group_titles or {}).items()}
    for f in fields(cls):
        if f.name in exclude:
            continue
        default = field_default(f)
        meta = f.metadata
        target = groups.get(meta.get("role"), parser)
        flag = "--" + f.name.replace("_", "-")
        text = meta.get("help", "") + " (default: %(default)s)"
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta.get("help", ""))
        else:  # choices are checked by the dataclass, whose message names the field and the choices
            choices = meta.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else type(default).__name__.upper()
            target.add_argument(flag, type=type(default), default=default, metavar=metavar, help=text)


def from_args(args: argparse.Namespace, cls, **overrides):
    return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **overrides})
