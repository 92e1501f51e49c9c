"""The package's shape, checked: imports point one way (no cycle among advreid's subpackages, each layer imports
only the layers below it), nobody imports another module's private names, and no function grows past the limits
(120 lines; 12 parameters for public functions and constructors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "advreid"
BASE = {"utils", "registry", "config"}
# what each part of advreid may import (besides itself): cli -> experiments -> evaluation -> {attacks, defenses,
# engine} -> models -> data -> {ops, registry, config, utils}; robust (the versioned worst-case ensemble) sits on
# evaluation, below experiments; reporting reads result files only
ALLOWED: dict[str, set[str]] = {
    "utils": set(), "registry": set(), "config": {"registry"},
    "ops": {"utils"},
    "data": {"ops"} | BASE,
    "models": {"data", "ops"} | BASE,
    "losses": {"models", "data", "ops"} | BASE,
    "engine": {"models", "losses", "data", "ops"} | BASE,
    "attacks": {"models", "data", "ops"} | BASE,
    "defenses": {"attacks", "engine", "models", "losses", "data", "ops"} | BASE,
    "evaluation": {"attacks", "defenses", "engine", "models", "losses", "data", "ops"} | BASE,
    "robust": {"evaluation", "attacks", "defenses", "engine", "models", "losses", "data", "ops"} | BASE,
    "reporting": {"utils"},
    "experiments": {"robust", "evaluation", "attacks", "defenses", "engine", "models", "losses", "data", "ops",
                    "reporting"} | BASE,
    "cli": {"experiments", "robust", "evaluation", "attacks", "defenses", "engine", "models", "losses", "data",
            "ops", "reporting"} | BASE,
    "__init__": BASE, "__main__": {"cli"},
}


def _modules() -> list[tuple[Path, str, ast.Module]]:
    out = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        dotted = ".".join(("advreid", *rel.with_suffix("").parts)).removesuffix(".__init__")
        out.append((p, dotted, ast.parse(p.read_text(encoding="utf-8"))))
    return out


def _part(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(dotted: str, is_pkg: bool, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every advreid import, relative ones resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("advreid")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = dotted.split(".") if is_pkg else dotted.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.startswith("advreid"):
                out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def test_imports_point_one_way_and_no_private_names() -> None:
    edges: dict[str, set[str]] = {}
    problems = []
    for path, dotted, tree in _modules():
        src = _part(dotted)
        for mod, names, line in _imports(dotted, path.name == "__init__.py", tree):
            dst = _part(mod)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path.relative_to(SRC)}:{line} imports private {private} from {mod}")
            if dst == src or mod == "advreid":
                continue
            edges.setdefault(src, set()).add(dst)
            if dst not in ALLOWED.get(src, set()):
                problems.append(f"{path.relative_to(SRC)}:{line} ({src}) imports {mod} ({dst})")
    assert not problems, "\n".join(problems)
    # and no cycle among the parts (the allowed table is a DAG, this checks the real graph too)
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*stack, n, m])}")
            if not state.get(m):
                visit(m, [*stack, n])
        state[n] = 2

    for n in sorted(edges):
        if not state.get(n):
            visit(n, [])


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def test_functions_are_small() -> None:
    too_long, too_many = [], []
    for path, _dotted, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 120:
                    too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
                public = not node.name.startswith("_") or node.name == "__init__"
                if public and _params(node) > 12:
                    too_many.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({_params(node)} params)")
    assert not too_long, "functions over 120 lines:\n" + "\n".join(too_long)
    assert not too_many, "public functions over 12 parameters:\n" + "\n".join(too_many)


def test_the_checker_sees_a_violation(tmp_path) -> None:
    """The import walk resolves relative imports and flags private names (it would catch a regression)."""
    tree = ast.parse("from .robustness import _plan\nfrom ..experiments import bench\n")
    got = _imports("advreid.evaluation.x", False, tree)
    assert got == [("advreid.evaluation.robustness", ["_plan"], 1), ("advreid.experiments", ["bench"], 2)]
