"""The package's imports run one way, bottom to top, and stay that way.

Every module belongs to one layer; a module may import its own layer and the layers below it, never one above,
and no set of modules imports itself in a circle. Imports inside functions count too (a lazy import is still a
dependency). The map below is the architecture README "How it is built" describes: a new module must be placed.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydllm"

LAYERS = ["core", "data", "engine", "evaluation", "runs and sweeps", "top"]
LAYER_OF = {
    # core: pure tensor and config code; no Ray, DeepSpeed or MLflow
    "config": "core", "masking": "core", "objective": "core", "sampler": "core", "model": "core",
    "tokenizer": "core", "archs": "core",
    # data and tasks
    "corpora": "data", "data": "data", "tasks": "data",
    # engine: backbone adapter, the embedded model's base, checkpoints, the worker's training loop
    "checkpoints": "engine", "pretrain": "engine", "backbone": "engine", "worker": "engine",
    # evaluation and probes, and the trial loop that plugs them into the engine's loop
    "evaluation": "evaluation", "probes": "evaluation", "trial": "evaluation",
    # one run's driver, sweeps, MLflow
    "tracking": "runs and sweeps", "train": "runs and sweeps", "search_space": "runs and sweeps",
    "tune": "runs and sweeps", "results": "runs and sweeps", "report": "runs and sweeps", "cluster": "runs and sweeps",
    "pareto": "runs and sweeps", "pareto_asha": "runs and sweeps", "pareto_results": "runs and sweeps",
    "searchers": "runs and sweeps",
    # command line and benchmarks
    "cli": "top", "bench": "top", "console": "top",
}
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


def unit_of(module: str, root_name: str) -> str | None:
    """The layer-map key of a module: `raydllm.tasks.gsm8k` -> `tasks`, `raydllm.backbone` -> `backbone`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root_name else None


def check_layers(root: Path, layer_of: dict[str, str]) -> list[str]:
    """Every violation in the package at `root`, as one line each (empty when the layering holds)."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        unit = unit_of(name, root.name)
        if unit is None:  # the package's own __init__
            continue
        if unit not in layer_of:
            problems.append(f"{name}: not in the layer map")
            continue
        inside, outside = imports_of(path, root)
        if layer_of[unit] == "core":
            problems += [f"{name} (core) imports {lib}" for lib in sorted(outside) if lib in CORE_FORBIDDEN]
        for target in sorted(inside):
            target_unit = unit_of(target, root.name)
            if target_unit is None or target_unit == unit or target_unit not in layer_of:
                continue
            edges.setdefault(unit, set()).add(target_unit)
            if rank[layer_of[target_unit]] > rank[layer_of[unit]]:
                problems.append(f"{name} ({layer_of[unit]}) imports {target} ({layer_of[target_unit]})")
            if target_unit == "cli":
                problems.append(f"{name} imports the command line ({target})")
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
    assert check_layers(PACKAGE, LAYER_OF) == []


def test_every_module_docstring_names_its_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(module_name(path, PACKAGE), PACKAGE.name)
        if unit is None:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if f"{LAYER_OF[unit]} layer" not in doc.splitlines()[0].lower() if doc else True:
            wrong.append(f"{path.relative_to(PACKAGE)}: {doc[:60]!r}")
    assert wrong == []


@pytest.fixture
def synthetic_package(tmp_path):
    """A copy-shaped package: core `masking` -> nothing; engine `worker` -> core; top `cli`."""
    root = tmp_path / "raydllm"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "masking.py").write_text('"""Core layer: x."""\nimport torch\n')
    (root / "worker.py").write_text('"""Engine layer: x."""\nfrom .masking import mask_tokens\n')
    (root / "cli.py").write_text('"""Top layer: x."""\nfrom .worker import WorkerLoop\n')
    return root


def test_checker_accepts_a_clean_package(synthetic_package):
    assert check_layers(synthetic_package, LAYER_OF) == []


def test_checker_catches_an_upward_import(synthetic_package):
    (synthetic_package / "masking.py").write_text('"""Core layer: x."""\ndef f():\n    from .worker import WorkerLoop\n')
    problems = check_layers(synthetic_package, LAYER_OF)
    assert "raydllm.masking (core) imports raydllm.worker.WorkerLoop (engine)" in problems
    assert any(p.startswith("import cycle: masking -> worker") for p in problems)


def test_checker_catches_the_cli_imported_and_ray_in_the_core(synthetic_package):
    (synthetic_package / "worker.py").write_text('"""Engine layer: x."""\nfrom raydllm.cli import emit_json\n')
    (synthetic_package / "masking.py").write_text('"""Core layer: x."""\nimport ray.train\n')
    problems = check_layers(synthetic_package, LAYER_OF)
    assert "raydllm.worker imports the command line (raydllm.cli.emit_json)" in problems
    assert "raydllm.masking (core) imports ray" in problems


def test_checker_catches_an_unplaced_module(synthetic_package):
    (synthetic_package / "newthing.py").write_text('"""x."""\n')
    assert check_layers(synthetic_package, LAYER_OF) == ["raydllm.newthing: not in the layer map"]
