"""The shape of the package: no import runs upward (every module imports only from its own layer or the layers
below it), and no function is longer than 80 lines.

The layers, bottom to top, as the README's Layout section lists them. An import inside a function counts too (a lazy
import is still an arrow)."""

import ast
from pathlib import Path

import pytest

import tracelens

PACKAGE = Path(tracelens.__file__).parent

LAYERS = [
    ("errors", "io", "records", "types", "metrics", "math", "provenance"),
    ("model", "hooks", "testing"),
    ("methods",),
    ("datasets", "store"),
    ("judges",),
    ("serving",),
    ("pipeline",),
    ("app",),
    ("cli", "__init__"),
]
"""Each layer's top-level modules and sub-packages of `tracelens`."""

RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """The top-level part of a dotted `tracelens.` module name ("tracelens.model.hooks" -> "model")."""
    return module.split(".")[1] if "." in module else "__init__"


def _modules() -> list[tuple[str, Path]]:
    return [(".".join(("tracelens", *p.relative_to(PACKAGE).with_suffix("").parts)), p)
            for p in sorted(PACKAGE.rglob("*.py"))]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """`(line, module)` for every `tracelens` import in the file at `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "tracelens" or n.startswith("tracelens.")]
    return found


def test_every_module_has_a_layer():
    assert {_part(m) for m, _ in _modules()} <= set(RANK)


@pytest.mark.parametrize("module, path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_import_runs_upward(module, path):
    own = RANK[_part(module)]
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}" for line, target in imports_of(path)
              if target != "tracelens" and RANK[_part(target)] > own]
    if _part(module) != "__init__":
        upward += [f"{path.relative_to(PACKAGE.parent)}:{line} imports the package root"
                   for line, target in imports_of(path) if target == "tracelens"]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tracelens.pipeline.report import write_report\n")
    assert imports_of(bad) == [(2, "tracelens.pipeline.report")]
    assert RANK[_part("tracelens.pipeline.report")] > RANK[_part("tracelens.serving.backends")]


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for _, path in _modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)
