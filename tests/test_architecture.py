"""The shape the code promises (issue 14): layers by dependency direction, no import
cycles, no probing of the signaller contract, files a reader can hold in their head."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where each installed package lives in the repository.
PACKAGES = {
    "tether": REPO / "protos" / "tether",
    "tether.core": REPO / "protos" / "tether" / "core",
    "tether.rpc": REPO / "protos" / "tether" / "rpc",
    "tether.client": REPO / "protos" / "tether" / "client",
    "tether.agent": REPO / "agent",
    "tether.coordinator": REPO / "coordinator",
    "tether.coordinator.cli": REPO / "coordinator" / "cli",
    "tether.signallers": REPO / "signallers",
}


def modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in root.glob("*.py"):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def runtime_imports(path: Path) -> set[str]:
    """Modules imported when the module is imported: top level, outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    mods = modules()
    graph = {m: {i for i in runtime_imports(p) if i in mods and i != m} for m, p in mods.items()}
    for m, deps in graph.items():  # a package's __init__ reached through `from pkg import x`
        graph[m] = {d for d in deps if not (mods[d].name == "__init__.py" and d in m)}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def walk(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle.extend([*stack[stack.index(d):], d] if d in stack else [m, d])
                return True
            if state.get(d) is None and walk(d, [*stack, d]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and walk(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize(("module", "forbidden"), [
    ("tether.coordinator.core", ("tether.v1", "grpc", "google.protobuf")),
    ("tether.core.model", ("tether.v1", "grpc", "google.protobuf", "docker", "asyncssh")),
    ("tether.core.sessions", ("tether.v1", "grpc", "google.protobuf")),
    ("tether.agent.authority", ("grpc", "docker", "asyncssh", "tether.v1")),
])
def test_inner_layers_import_no_outer_ones(module: str, forbidden: tuple[str, ...]) -> None:
    code = (f"import sys, {module}\n"
            f"print(sorted({{m.split('.')[0] + ('.v1' if m.startswith('tether.v1') else '')"
            f" for m in sys.modules if m.startswith({forbidden!r})}}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert res.stdout.strip() == "[]", f"{module} pulls in {res.stdout.strip()}"


def test_no_source_file_is_over_500_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if p.is_relative_to(REPO / "agent") or p.is_relative_to(REPO / "coordinator")
            or p.is_relative_to(REPO / "signallers")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def contract_members() -> set[str]:
    """Names the GroupHandle and Signaller Protocols declare."""
    tree = ast.parse((REPO / "signallers" / "base.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("GroupHandle", "Signaller"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    return names


def test_nothing_probes_the_signaller_contract() -> None:
    """Every capability the agent uses is declared in signallers/base.py: a getattr or
    hasattr naming one of them would be a missing line in the Protocol."""
    members = contract_members()
    assert {"send_signals", "emptied_at", "detail", "cgroup", "reattach"} <= members
    offenders = []
    for name, path in modules().items():
        if not name.startswith(("tether.agent", "tether.signallers", "tether.coordinator")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr") and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in members:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.args[1].value}")
    assert offenders == []
