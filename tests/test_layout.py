"""The layout's rules, read from the imports (ast) of every project module: one concern per folder,
every import pointing down, and one default per run setting."""

import ast
from pathlib import Path

import pytest
import tomllib

from strategies.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fededit_core", "strategies", "server_app", "client_app", "wire", "bench", "deploy")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in it (lazy imports too), resolved to full names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _project_edges(name: str) -> set[str]:
    """Project modules ``name`` depends on (a package's own ``__init__`` is not an edge)."""
    out = set()
    for target in IMPORTS[name]:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + ".") and "." in target:
            out.add(target)
    return out


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name in IMPORTS
        if name == prefix or name.startswith(prefix + ".")
        for target in IMPORTS[name]
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


def test_the_rules_see_every_package():
    for pkg in (
        "fededit_core.memit.editor",
        "strategies.federation",
        "server_app.app",
        "client_app.app",
        "wire.messages",
        "bench.reproduce",
        "deploy.simulate",
    ):
        assert pkg in MODULES
    assert "fededit_core.memit.editor" in _project_edges("fededit_core.client.participant")


def test_no_import_cycles_between_modules():
    graph = {name: _project_edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert cycles == []


@pytest.mark.parametrize(
    "prefix, forbidden",
    [
        ("fededit_core", ("strategies", "server_app", "client_app", "wire", "bench", "deploy", "flwr", "grpc")),
        ("strategies", ("server_app", "client_app", "wire", "bench", "deploy", "flwr", "grpc", "fededit_core.client")),
        ("server_app", ("client_app",)),
        ("client_app", ("server_app",)),
        ("wire", ("fededit_core", "strategies", "server_app", "client_app", "bench", "deploy")),
    ],
)
def test_imports_point_down(prefix, forbidden):
    assert _violations(prefix, forbidden) == []


def test_the_engine_keeps_its_modules_in_subpackages():
    top = sorted(p.name for p in (ROOT / "fededit_core").glob("*.py"))
    assert len(top) <= 4, top
    for sub in ("model", "memit", "fedleke", "client", "data", "eval"):
        assert (ROOT / "fededit_core" / sub / "__init__.py").is_file()


def test_the_run_config_in_pyproject_is_run_settings_defaults():
    """Flower reads the run config's defaults from pyproject.toml; they must be RunSettings' own."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunSettings().run_config()
