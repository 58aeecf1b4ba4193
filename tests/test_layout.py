"""The package's layout: every module stands above all it imports (the README's "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    """``fadrm.config.options`` for ``src/fadrm/config/options.py``; a package is its ``__init__``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # ``from .pkg import module`` imports the module; ``from .module import name`` the module.
            found.update(f"{target}.{alias.name}" for alias in node.names)
            found.add(target)
    return (found & modules) - {name}


def test_the_package_imports_form_no_cycle():
    """Each module imports only modules below it: the import graph, lazy imports included, has no cycle."""
    files = {module_name(path): path for path in (SRC / "fadrm").rglob("*.py")}
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    assert graph["fadrm.api"] and "fadrm.config.options" in graph["fadrm.config.resolver"]  # the graph is read
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for imported in sorted(graph[name]):
            assert imported not in path, "import cycle: " + " -> ".join([*path[path.index(imported) :], imported])
            if imported not in done:
                visit(imported, [*path, imported])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])


def test_every_registry_is_loaded_by_its_kind_in_a_fresh_interpreter():
    """``import fadrm`` loads no stage: a registry asked for by kind (an option's choices) comes from the
    module :data:`fadrm.registry.PROVIDERS` names, and every kind the package makes is there."""
    import subprocess
    import sys

    import fadrm.api  # noqa: F401  (every module that registers something)
    from fadrm.registry import _BY_KIND, PROVIDERS

    assert set(_BY_KIND) <= set(PROVIDERS)
    script = (
        "import sys, fadrm\n"
        "assert 'torch' not in sys.modules, 'import fadrm loaded torch'\n"
        "from fadrm.registry import PROVIDERS, registry\n"
        "print(all(registry(kind).names() for kind in PROVIDERS))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr


def test_the_public_names_are_those_the_package_loads_on_use():
    import fadrm

    assert set(fadrm.__all__) == {*fadrm._PUBLIC, "__version__"}
    assert all(getattr(fadrm, name) is not None for name in fadrm.__all__)
