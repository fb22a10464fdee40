"""The experimental grid of a replication study (experiments/paper_grid.yaml): cells, schedules, seeds.

A cell is one row of a table: backbone x regime x attention x freezing schedule, run once per seed.
A table may mark one row `reference: true` (every other row, and the ensemble, is compared with it)
and ask for `ensemble: true` (per seed, the ensemble of its other rows).
`load_grid` reads and checks a grid file (every value is a TrainConfig field, type-checked, and every
error names the file and the key); `trial_configs` expands the chosen cells into the trials' configs.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..config import REPO_ROOT, WHERE, TrainConfig, complete, defaults, fields_with_role, is_ensemble, read_recipe

GRID = REPO_ROOT / "experiments" / "paper_grid.yaml"
PUBLISHED = REPO_ROOT / "experiments" / "published_results.yaml"
CELL_KEYS = ("backbone", "regime", "attention", "schedule")
# Fields the grid and the command line set for every trial (--set may not): the cell, its schedule's
# frozen epochs, the budget, the seed, and the study's MLflow run.
STUDY_OWNED = ("backbone", "regime", "attention", "freeze_epochs", "epochs", "seed", "parent_run")


def load_grid(path: str | Path) -> dict:
    """A grid file, checked before any trial starts: its sections, its paper settings and every cell's
    values as TrainConfig fields, its schedules as epoch counts."""
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot be read as YAML: {err}") from None
    for key in ("paper", "seeds", "schedules", "tables"):
        if not isinstance(grid, dict) or key not in grid:
            raise ValueError(f"{path}: {key}: missing (a grid has paper, seeds, schedules and tables)")
    grid["paper"] = paper_settings(grid["paper"], path)
    TrainConfig.from_dict(grid["paper"], f"{path}: paper")
    for name, epochs in grid["schedules"].items():
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ValueError(f"{path}: schedules.{name}: must be a number of epochs, got {epochs!r}")
    for cell in grid_cells(grid):
        if cell.schedule not in grid["schedules"]:
            raise ValueError(f"{path}: tables.{cell.table}: unknown schedule {cell.schedule!r}; "
                             f"the grid has {sorted(grid['schedules'])}")
        TrainConfig.from_dict({**grid["paper"], **dict(cell.extra), "backbone": cell.backbone, "regime": cell.regime,
                               "attention": cell.attention}, f"{path}: tables.{cell.table}")
    cells = grid_cells(grid)
    for table, spec in grid["tables"].items():
        if sum(c.reference for c in cells if c.table == table) > 1:
            raise ValueError(f"{path}: tables.{table}: more than one row is the reference")
        if not isinstance(spec.get("ensemble", False), bool):
            raise ValueError(f"{path}: tables.{table}.ensemble: true or false, got {spec['ensemble']!r}")
    return grid


def paper_settings(paper: dict, path: Path) -> dict:
    """A grid's settings for every trial: `paper` as written, on top of the recipe file it names
    (`recipe:`, relative to the grid file), less the recipe's cell fields, which the grid's rows and
    schedules set."""
    if not isinstance(paper, dict) or "recipe" not in paper:
        return paper
    recipe = read_recipe(path.parent / paper["recipe"])
    cell_fields = ("backbone", "regime", "attention", "freeze_epochs")
    own = {k: v for k, v in paper.items() if k != "recipe"}
    return {**{k: v for k, v in recipe.items() if k not in cell_fields}, **own}


@dataclass(frozen=True)
class Cell:
    """One row of a table: one configuration, run once per seed."""
    table: str
    backbone: str
    regime: str
    attention: str
    schedule: str
    extra: tuple = ()  # further TrainConfig fields the grid sets for this cell, as (key, value) pairs
    reference: bool = False  # the row every other row of its table (and its ensemble) is compared with

    @property
    def extra_label(self) -> str:
        """The further fields as a table or figure shows them after the schedule: ", freeze_depth 14"."""
        return "".join(f", {k} {v}" for k, v in self.extra)

    @property
    def row(self) -> str:
        """The rows as the paper names them: scratch, tl, tl_da, tl_da_se."""
        return self.regime if self.attention == "none" else f"{self.regime}_{self.attention}"


def grid_cells(grid: dict) -> list[Cell]:
    """Every cell of every table, in the grid file's order; lists in an entry are crossed."""
    cells = []
    for table, spec in grid["tables"].items():
        for entry in spec["cells"]:
            lists = {k: v if isinstance(v, list) else [v] for k, v in {"attention": "none", **entry}.items()}
            for values in itertools.product(*lists.values()):
                fields = dict(zip(lists, values))
                core = {k: fields.pop(k) for k in CELL_KEYS}
                reference = bool(fields.pop("reference", False))
                cells.append(Cell(table, **core, extra=tuple(sorted(fields.items())), reference=reference))
    return cells


def select(cells: list[Cell], only=(), backbones=(), rows=(), schedules=()) -> list[Cell]:
    """The cells the filters keep; an empty filter keeps all."""
    return [c for c in cells if (not only or c.table in only) and (not backbones or c.backbone in backbones)
            and (not rows or c.row in rows) and (not schedules or c.schedule in schedules)]


def frozen_epochs(grid: dict, schedule: str, epochs: int) -> int:
    """A schedule's frozen epochs, scaled from the paper's epochs to this study's (a budget keeps the
    proportion: frozen10 of 20 is 1 of 2)."""
    return min(epochs, math.floor(grid["schedules"][schedule] * epochs / grid["paper"]["epochs"] + 0.5))


def trial_configs(grid: dict, cells: list[Cell], seeds: list[int], settings: dict) -> list[dict]:
    """Every (cell, seed) trial as a complete TrainConfig dict, seed by seed (a first look at every
    cell comes before repeats). settings: the fields every trial shares. A configuration that several
    cells share (a row of both tables, schedules that coincide on a budget) runs once."""
    unique = {}
    for seed, cell in itertools.product(seeds, cells):
        values = {**settings, **dict(cell.extra), "backbone": cell.backbone, "regime": cell.regime,
                  "attention": cell.attention, "seed": seed,
                  "freeze_epochs": frozen_epochs(grid, cell.schedule, settings["epochs"])}
        config = asdict(TrainConfig.from_dict(values))  # validated before any trial starts
        unique.setdefault(json.dumps(config, sort_keys=True), config)
    return list(unique.values())


def belongs(config: dict | None, cell: Cell, grid: dict) -> bool:
    """Whether a trial's config is one of the cell's (None: a trial that never started). A field another
    cell sets and this one does not must have the grid's value for it (a single model's row does not
    take its cross-fitted row's trials)."""
    if config is None or is_ensemble(config):
        return False
    config, unset = complete(config), {**defaults(), **grid["paper"]}  # an unset field's value in every trial
    varied = {k for other in grid_cells(grid) for k, _ in other.extra} - set(fields_with_role(WHERE))  # computed fields
    expected = {**{k: unset[k] for k in varied}, **dict(cell.extra)}
    return (all(config[k] == getattr(cell, k) for k in CELL_KEYS[:3]) and all(config[k] == v for k, v in expected.items())
            and config["freeze_epochs"] == frozen_epochs(grid, cell.schedule, config["epochs"]))


