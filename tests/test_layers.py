"""The package's imports run one way, bottom to top, and stay that way.

The package's folders are its layers, lowest first: `core` -> `data` -> `engine` -> `evaluation` -> `sweep` ->
`bench` -> `cli`. A module may import its own folder and the folders below it, never one above, and no set of
modules imports itself in a circle. Imports inside functions count too (a lazy import is still a dependency).
Nothing imports the CLI, and the core runs without Ray, DeepSpeed or MLflow.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydllm"

LAYERS = ["core", "data", "engine", "evaluation", "sweep", "bench", "cli"]
# Libraries the core never imports: it must run (and be tested) without any of them.
CORE_FORBIDDEN = ("ray", "deepspeed", "mlflow")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def imports_of(path: Path, root: Path) -> tuple[set[str], set[str]]:
    """(intra-package modules imported, top-level third-party packages imported) by the file at `path`."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target == root.name or target.startswith(root.name + "."):
                inside.add(target)
            else:
                outside.add(target.split(".")[0])
    return inside, outside


def layer_of(module: str, root_name: str) -> str | None:
    """The layer of a module: the first folder under the package (`raydllm.data.tasks.gsm8k` -> `data`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root_name else None


def check_layers(root: Path) -> list[str]:
    """Every violation in the package at `root`, as one line each (empty when the layering holds)."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name == root.name:  # the package's own __init__
            continue
        if path.parent == root or layer_of(name, root.name) not in rank:
            problems.append(f"{name}: not in a layer folder ({', '.join(LAYERS)})")
            continue
        layer = layer_of(name, root.name)
        inside, outside = imports_of(path, root)
        if layer == "core":
            problems += [f"{name} (core) imports {lib}" for lib in sorted(outside) if lib in CORE_FORBIDDEN]
        for target in sorted(inside):
            target_layer = layer_of(target, root.name)
            if target_layer is None or target_layer not in rank:
                continue
            if target_layer == "cli" and layer != "cli":
                problems.append(f"{name} imports the command line ({target})")
            if target_layer == layer:
                continue
            edges.setdefault(layer, set()).add(target_layer)
            if rank[target_layer] > rank[layer]:
                problems.append(f"{name} ({layer}) imports {target} ({target_layer})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way():
    assert check_layers(PACKAGE) == []


def test_the_package_root_holds_only_layer_folders():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert loose == [] and folders == sorted(LAYERS)


def test_every_module_docstring_names_its_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(module_name(path, PACKAGE), PACKAGE.name)
        if layer is None:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not doc or f"{layer} layer" not in doc.splitlines()[0].lower():
            wrong.append(f"{path.relative_to(PACKAGE)}: {doc[:60]!r}")
    assert wrong == []


@pytest.fixture
def synthetic_package(tmp_path):
    """A package shaped like raydllm: core/masking -> nothing; engine/worker -> core; cli/app -> engine."""
    root = tmp_path / "raydllm"
    for folder in ("core", "engine", "cli"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "core" / "masking.py").write_text('"""Core layer: x."""\nimport torch\n')
    (root / "engine" / "worker.py").write_text('"""Engine layer: x."""\nfrom ..core.masking import mask_tokens\n')
    (root / "cli" / "app.py").write_text('"""CLI layer: x."""\nfrom raydllm.engine.worker import WorkerLoop\n')
    return root


def test_checker_accepts_a_clean_package(synthetic_package):
    assert check_layers(synthetic_package) == []


def test_checker_catches_an_upward_import(synthetic_package):
    (synthetic_package / "core" / "masking.py").write_text(
        '"""Core layer: x."""\ndef f():\n    from ..engine.worker import WorkerLoop\n')
    problems = check_layers(synthetic_package)
    assert "raydllm.core.masking (core) imports raydllm.engine.worker.WorkerLoop (engine)" in problems
    assert "import cycle: core -> engine" in problems


def test_checker_catches_the_cli_imported_and_ray_in_the_core(synthetic_package):
    (synthetic_package / "engine" / "worker.py").write_text('"""Engine layer: x."""\nfrom raydllm.cli.app import emit_json\n')
    (synthetic_package / "core" / "masking.py").write_text('"""Core layer: x."""\nimport ray.train\n')
    problems = check_layers(synthetic_package)
    assert "raydllm.engine.worker imports the command line (raydllm.cli.app.emit_json)" in problems
    assert "raydllm.core.masking (core) imports ray" in problems


def test_checker_catches_a_module_outside_the_layer_folders(synthetic_package):
    (synthetic_package / "newthing.py").write_text('"""x."""\n')
    (synthetic_package / "misc").mkdir()
    (synthetic_package / "misc" / "thing.py").write_text('"""x."""\n')
    assert check_layers(synthetic_package) == [
        "raydllm.misc.thing: not in a layer folder (core, data, engine, evaluation, sweep, bench, cli)",
        "raydllm.newthing: not in a layer folder (core, data, engine, evaluation, sweep, bench, cli)"]
