"""Who may import whom (README "Layout"): three floors, each importing only its own and those below.

- ground, `harness/`: models, data, the training loop, evaluation, records; imports nothing above it;
- methods, `specdef/`, `baselines/`, `attacks/`: each over the ground, never over the top;
- top, `runner/`, `reporting/`, `experiments/`, `benchmarks/`, `run.py` and `hydra_plugins/` (where Hydra
  looks for the project's sweeper): may use every floor.

The imports are read from each module's syntax tree, those inside functions (lazy imports) included,
and no module may reach itself again through its imports (an import circle).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"harness": 1, "specdef": 2, "baselines": 2, "attacks": 2,
          "runner": 3, "reporting": 3, "experiments": 3, "benchmarks": 3, "run": 3, "hydra_plugins": 3}


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of the floors' packages, and run.py."""
    found = {"run": root / "run.py"} if (root / "run.py").is_file() else {}
    for package in FLOORS:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import, from the module's own package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c -> a.b -> a: the project module that holds it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_floor_imports_a_floor_above_it():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_check_sees_upward_imports_and_circles_lazy_ones_included(tmp_path):
    """The two checks above on a planted house: a lazy upward import and a circle through a function."""
    files = {"harness/__init__.py": "", "harness/a.py": "def f():\n    from runner import top\n",
             "runner/__init__.py": "", "runner/top.py": "from . import loop\n",
             "runner/loop.py": "def g():\n    import runner.top\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["harness.a -> runner.top"]
    assert circles(graph) == [["runner.loop", "runner.top"]]


@pytest.mark.parametrize("module", ["reporting.report", "reporting.tables", "reporting.plots",
                                    "reporting.adaptive", "reporting.readme", "reporting.callbacks",
                                    "reporting.lr_window"])
def test_reporting_loads_no_torch(module):
    """Tables are built from records: reading them needs neither torch nor a model."""
    out = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
