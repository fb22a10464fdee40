"""The package's wings and the direction of imports between them (docs/design.md): commands ->
studies / analysis -> run -> tracking -> models / data -> base. Read from the source, so an import inside
a function counts as much as one at the top."""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import orestudy

PACKAGE = Path(orestudy.__file__).parent
BASE = {"config", "device", "environment", "files"}
BELOW = {  # wing: the wings it may import (and itself)
    "commands": {"studies", "analysis", "run", "tracking", "models", "data"},
    "studies": {"run", "tracking", "models", "data"},
    "analysis": {"run", "tracking", "models", "data"},
    "run": {"tracking", "models", "data"},
    "tracking": {"models", "data"},
    "models": set(),
    "data": set(),
    "base": set(),
}
TOP = {"orestudy", "orestudy.__main__", "orestudy.moved"}  # the API and the entry points stand above the wings


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def wing(module: str) -> str:
    part = module.split(".")[1] if "." in module else "__init__"
    if part == "pyfunc_model":  # the MLflow model's code, which tracking logs: it imports no orestudy
        return "tracking"
    return "base" if part in BASE else part


def imported(module: str, path: Path, known) -> set[str]:
    """The orestudy modules that module imports, resolved from its relative and absolute imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (package.rsplit(".", node.level - 1)[0] if node.level > 1 else package) if node.level else ""
            target = ".".join(filter(None, [base, node.module]))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("orestudy")}


def test_imports_go_down_the_wings_only():
    known = modules()
    wrong = []
    for module, path in known.items():
        if module in TOP:
            continue
        mine = wing(module)
        for other in imported(module, path, known):
            theirs = wing(other)
            if theirs not in (mine, "base") and theirs not in BELOW[mine]:
                wrong.append(f"{module} ({mine}) imports {other} ({theirs})")
    assert not wrong, "\n".join(wrong)
    assert {wing(m) for m in known if m not in TOP} == set(BELOW)


def test_command_modules_load_no_torch_ray_or_mlflow():
    faces = sorted(m for m in modules() if m.startswith("orestudy.commands."))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in faces)
            + "print(sorted(n for n in ('torch', 'ray', 'mlflow', 'timm') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]" and len(faces) >= 12


def test_every_module_name_appears_once():
    stems = [m.rsplit(".", 1)[-1] for m in modules() if not m.endswith("__init__") and m != "orestudy"]
    assert sorted(s for s in set(stems) if stems.count(s) > 1) == []


def test_old_import_paths_are_the_moved_modules():
    """Pickles of studies made before the wings name orestudy.study.train_trial; `python -m orestudy.train`
    still runs the command."""
    from orestudy.studies import study

    old = pickle.dumps(study.train_trial, protocol=0).replace(b"orestudy.studies.study\n", b"orestudy.study\n")
    assert b"orestudy.study\n" in old
    assert pickle.loads(old) is study.train_trial
    import orestudy.training
    from orestudy.run import training
    assert orestudy.training is training
    out = subprocess.run([sys.executable, "-m", "orestudy.compare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m orestudy.compare")


def test_the_api_loads_no_torch():
    code = "import sys, orestudy; print(orestudy.TrainConfig().backbone, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["mobilenet_v2", "False"]


def test_every_function_fits_in_one_sitting():
    """No function or method over 60 lines (the house rule): a longer one is split by what it does."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long
