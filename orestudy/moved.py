"""The import paths of orestudy before its wings (0.1), kept for one release: `python -m orestudy.train`
(the usage lines print it) and the pickles of studies made before, in which Ray and Optuna name
orestudy's functions by their old module (orestudy.study.train_trial, ...).

Hand-written: importlib has no alias mechanism; this finder answers an old name with the module that now
holds it, the same object, so nothing is loaded twice.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

OLD = {  # old orestudy.<name> -> where it lives now
    **{face: f"commands.{face}" for face in ("cli", "train", "val", "predict", "export", "eda", "audit", "replicate",
                                              "search", "compare", "answers", "ensemble", "install_weights")},
    **{name: f"run.{name}" for name in ("training", "features", "evaluation", "prediction", "validation",
                                        "exporting", "reports")},
    **{name: f"studies.{name}" for name in ("study", "grid", "replication", "grid_report", "search_study",
                                            "search_space", "search_report", "effects", "stats")},
    "exploration": "analysis.exploration", "label_audit": "analysis.label_audit",
}


class AliasSpec(importlib.machinery.ModuleSpec):
    """runpy takes a module's package from its spec: the moved module's, so its relative imports work."""

    @property
    def parent(self):
        return self.loader.target.rpartition(".")[0]


class Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # create_module returned the loaded module

    def get_code(self, fullname):  # runpy: `python -m orestudy.train` runs the moved module as __main__
        return importlib.util.find_spec(self.target).loader.get_code(self.target)


class OldNames(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __package__ and name in OLD:
            moved = f"{__package__}.{OLD[name]}"  # runpy sets sys.argv[0] from the origin
            return AliasSpec(fullname, Alias(moved), origin=importlib.util.find_spec(moved).origin)
        return None


def install() -> None:
    if not any(isinstance(finder, OldNames) for finder in sys.meta_path):
        sys.meta_path.insert(0, OldNames())  # before any finder that could still see an old file
