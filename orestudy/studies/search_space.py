"""Search-space files: YAML in search_spaces/ (or any path), loaded and checked before anything runs.

A space has `params` (searched, by Optuna's TPE: int, float, loguniform or categorical), `fixed`
TrainConfig values every trial shares, a `budget` (epochs per trial, ASHA's grace epochs and
reduction factor, the number of trials, and the folds a trial's objective is averaged over) and a
`baseline`, the recipe the winner is retrained beside. Every error names the file and the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import REGIMES, REPO_ROOT, STUDY, WHERE, TrainConfig, defaults, fields_with_role

SPACES_DIR = REPO_ROOT / "search_spaces"
PARAM_KEYS = {"int": {"low", "high"}, "float": {"low", "high"}, "loguniform": {"low", "high"},
              "categorical": {"choices"}}
SECTIONS = {"description", "params", "fixed", "budget", "baseline"}
BUDGET = {"epochs": None, "grace_epochs": 1, "reduction_factor": 3, "trials": 30, "folds": 1}
# Where the data and results are and how trials run: set by the command line, never by a space; the
# seed is the split (searching it would pick a lucky split) and the folds belong to the budget.
RUNTIME_FIELDS = set(fields_with_role(WHERE, STUDY))
NOT_SEARCHED = RUNTIME_FIELDS | {"epochs", "seed", "folds", "fold"}
YAML_FLOAT_HINT = " (YAML reads 1e-4 as text: write 1.0e-4)"


class SearchSpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass
class SearchSpace:
    name: str
    path: Path
    raw: dict                     # the file's content, kept in the study so a resume can check it
    params: dict  # name -> optuna distribution
    fixed: dict
    baseline: dict
    epochs: int
    grace_epochs: int = 1
    reduction_factor: int = 3
    trials: int = 30
    folds: int = 1
    description: str = ""

    def config(self, values: dict) -> dict:
        """TrainConfig fields of a trial with these searched values."""
        return {**self.fixed, "epochs": self.epochs, **values}

    def baseline_config(self) -> dict:
        return {**self.fixed, **self.baseline}


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_path(name: str) -> Path:
    """A name in search_spaces/, or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise SearchSpaceError(f"{path}: no such search-space file")
        return path
    path = SPACES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SearchSpaceError(f"no search space {name!r} ({path} is missing); available: {', '.join(available_spaces())}")
    return path


def fail(path: Path, key: str, message: str):
    raise SearchSpaceError(f"{path}: {key}: {message}")


def mapping(path: Path, key: str, value, required: bool = False) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or (required and not value):
        fail(path, key, "missing or empty: expected a mapping" if required else "expected a mapping")
    return value


def check_config(path: Path, where: str, values: dict) -> None:
    """TrainConfig's own checks (field names, types, choices, ranges) on a space's values."""
    try:
        TrainConfig.from_dict(values)
    except ValueError as err:
        fail(path, where, str(err))


def read_budget(path: Path, budget: dict) -> dict:
    if set(budget) - set(BUDGET):
        fail(path, f"budget.{sorted(set(budget) - set(BUDGET))[0]}", f"unknown key; expected {sorted(BUDGET)}")
    for key, value in budget.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(path, f"budget.{key}", f"must be a positive integer, got {value!r}")
    if "epochs" not in budget:
        fail(path, "budget.epochs", "required: the epochs a trial that is not stopped early trains")
    budget = {**BUDGET, **budget}
    if budget["grace_epochs"] > budget["epochs"]:
        fail(path, "budget.grace_epochs", f"{budget['grace_epochs']} is more than budget.epochs ({budget['epochs']})")
    if budget["reduction_factor"] < 2:
        fail(path, "budget.reduction_factor", "must be at least 2")
    return budget


def read_param(path: Path, key: str, p, fixed: dict, epochs: int):
    """One searched parameter as an Optuna distribution; its extreme values must make valid configs."""
    import optuna  # loaded when a space is, so that `search --help` stays quick

    where = f"params.{key}"
    if key in NOT_SEARCHED:
        fail(path, where, "cannot be searched (epochs and folds are the budget's; seed is the split, and "
                          "searching it would pick a lucky split; the rest are set from the command line)")
    p = mapping(path, where, p, required=True)
    kind = p.get("type")
    if kind not in PARAM_KEYS:
        fail(path, f"{where}.type", f"must be one of {sorted(PARAM_KEYS)}, got {kind!r}")
    if set(p) - {"type"} != PARAM_KEYS[kind]:
        fail(path, where, f"a {kind} parameter takes exactly {sorted(PARAM_KEYS[kind])}, got {sorted(set(p) - {'type'})}")
    if kind == "categorical":
        examples = p["choices"]
        if not isinstance(examples, list) or not examples or any(isinstance(c, (dict, list)) for c in examples):
            fail(path, f"{where}.choices", "expected a non-empty list of plain values")
        distribution = optuna.distributions.CategoricalDistribution(examples)
    else:
        examples = low, high = p["low"], p["high"]
        number = int if kind == "int" else (int, float)
        if any(not isinstance(v, number) or isinstance(v, bool) for v in examples):
            fail(path, where, f"low and high must be {'integers' if kind == 'int' else 'numbers'}, got {low!r}, "
                              f"{high!r}{YAML_FLOAT_HINT if kind != 'int' else ''}")
        if low >= high:
            fail(path, where, f"low ({low}) must be below high ({high})")
        if kind == "loguniform" and low <= 0:
            fail(path, f"{where}.low", "must be positive on a log scale")
        distribution = optuna.distributions.IntDistribution(low, high) if kind == "int" else \
            optuna.distributions.FloatDistribution(float(low), float(high), log=kind == "loguniform")
    for value in examples:
        check_config(path, where, {**fixed, "epochs": epochs, key: value})
    return distribution


def load_space(name: str) -> SearchSpace:
    """Read and check a search space; every error names the file and the key."""
    path = space_path(name)
    try:
        raw = mapping(path, "(top level)", yaml.safe_load(path.read_text()), required=True)
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"{path}: not valid YAML: {err}") from err
    if set(raw) - SECTIONS:
        fail(path, ", ".join(sorted(set(raw) - SECTIONS)), f"unknown section; expected {sorted(SECTIONS)}")
    fixed, baseline = mapping(path, "fixed", raw.get("fixed")), mapping(path, "baseline", raw.get("baseline"))
    budget = read_budget(path, mapping(path, "budget", raw.get("budget"), required=True))
    spec = mapping(path, "params", raw.get("params"), required=True)
    for section, values in (("fixed", fixed), ("baseline", baseline)):
        for key in values:
            if key in RUNTIME_FIELDS or key in ("folds", "fold"):
                fail(path, f"{section}.{key}", "is set from the command line or the budget, not by a search space")
            if section == "fixed" and key in ("epochs", *spec):
                fail(path, f"fixed.{key}", "is searched or set by budget, so it cannot be fixed")
        check_config(path, section, {**fixed, "epochs": budget["epochs"], **values})
    params = {key: read_param(path, key, p, fixed, budget["epochs"]) for key, p in spec.items()}
    if raw.get("description") is not None and not isinstance(raw["description"], str):
        fail(path, "description", "expected text")
    return SearchSpace(path.stem, path, raw, params, fixed, baseline, budget["epochs"], budget["grace_epochs"],
                       budget["reduction_factor"], budget["trials"], budget["folds"], raw.get("description") or "")


def check_weights(space: SearchSpace) -> None:
    """A backbone whose ImageNet weights are not here would fail every trial that draws it: refused
    before the search starts (study.train_trial skips such runs; a search would only waste trials)."""
    from .. import models

    def values(key: str, config: dict, searched: bool) -> set:
        d = space.params.get(key) if searched else None
        return set(d.choices) if d is not None else {config.get(key, defaults()[key])}

    for where, config, searched in (("params", space.config({}), True), ("baseline", space.baseline_config(), False)):
        if not any(REGIMES[r]["weights"] == "imagenet" for r in values("regime", config, searched)):
            continue
        for backbone in sorted(values("backbone", config, searched)):
            try:
                models.create_model(backbone, 2, "imagenet")
            except models.WeightsUnavailable as err:
                raise SearchSpaceError(f"{space.path}: {where}: backbone {backbone}: {err}") from err
