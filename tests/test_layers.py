"""The layers run one way: every import in the source, read with ``ast``, points down or sideways, never up.

1. core ``fl``; 2. on it, each apart: ``data_prep``, ``server``, the ClientApp (``clients.client_app``) and the
on-device detector (``clients.detector``); 3. the application ``fedsound`` (CLI, demo, drivers), which nothing
imports; 4. ``benchmarks``, outside the installed packages. Imports inside functions count too, and the module
graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PROJECT = ("fl", "data_prep", "server", "clients", "fedsound", "configs", "benchmarks")
# layer of a module (longest prefix wins) -> the layers it may import
ALLOWED = {
    "configs": set(),  # package data only
    "clients": set(),  # the package's __init__: two subpackages apart
    "fl": {"fl", "configs"},
    "data_prep": {"fl", "data_prep"},
    "server": {"fl", "server"},
    "clients.client_app": {"fl", "clients.detector", "clients.profile_training"},
    "clients.profile_training": {"fl", "clients.detector"},
    "clients.detector": {"fl", "clients.detector"},
    "fedsound": {"fl", "configs", "data_prep", "server", "clients.client_app", "clients.detector",
                 "clients.profile_training", "fedsound"},
    "benchmarks": {"fl", "configs", "data_prep", "server", "clients.client_app", "clients.detector",
                   "clients.profile_training", "fedsound", "benchmarks"},
}
# third-party packages a layer must not need: the core and the detector run without the federated runtime
FORBIDDEN_THIRD_PARTY = {"fl": ("flwr", "ray"), "clients.detector": ("flwr", "ray"), "data_prep": ("flwr", "ray")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    found = {}
    for top in PROJECT:
        for path in sorted((REPO / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _layer(module: str) -> str:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    if not matches:
        raise AssertionError(f"{module}: in no layer; add it to tests/test_layers.py's ALLOWED")
    return max(matches, key=len)


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported name, line) of every import in the file; ``from a import b`` gives ``a.b`` when that is a
    module of the project, else ``a``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in SOURCES else base, node.lineno))
    return found


def _project_module(name: str) -> str | None:
    """The project module an import name refers to (the longest known prefix), or None for third party."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in SOURCES:
            return ".".join(parts[:end])
    return None


def test_every_project_import_points_down_or_sideways():
    upward = []
    for module, path in SOURCES.items():
        layer = _layer(module)
        for name, line in _imports(path, module):
            target = _project_module(name)
            if target is not None and _layer(target) not in ALLOWED[layer]:
                upward.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {target} ({_layer(target)})")
            if target is None:
                for banned in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                    if name == banned or name.startswith(banned + "."):
                        upward.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {name}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of ``graph`` (module -> imported modules) as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in graph.get(module, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [module, target] if target in path else [module, target]
            if target not in state and (cycle := visit(target, path + [module])):
                return cycle
        state[module] = 2
        return None

    for module in graph:
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    graph = {module: sorted({t for name, _ in _imports(path, module) if (t := _project_module(name)) and t != module})
             for module, path in SOURCES.items()}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle():
    """The shape of the circle the layering removed: a driver and the ServerApp importing each other."""
    graph = {"fl.simulate": ["server.server_app", "fl.config"], "server.server_app": ["fl.simulate"], "fl.config": []}
    assert find_cycle(graph) == ["fl.simulate", "server.server_app", "fl.simulate"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above catch what they are for: an import of the application from the core, inside a function."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from fedsound.cli import main\n    return main\n")
    imported = [_project_module(name) for name, _ in _imports(source, "fl.probe")]
    assert imported == ["fedsound.cli"] and _layer("fedsound.cli") not in ALLOWED[_layer("fl.probe")]


def test_the_detector_imports_without_the_federated_runtime():
    """Listening, enrolling and personalizing load neither Flower nor Ray (a laptop that only listens)."""
    code = ("import sys; import clients.detector.listen, clients.detector.enroll, clients.detector.personalize; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')); print(loaded)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
