"""The layers of the tree, read from the code's own imports: a module that
reaches up or sideways fails here, naming the import.

    hosts/          the simulated machine; imports nothing of migrate/
    foundation      migrate/{__init__,checksum,errors,units}.py
    protocol        frames, state machines, compression, proofs: no I/O
    net             sockets, TLS, rate limit, loop threads
    strategies      how the VMM reaches tags (through hosts/ only)
    engine          source and destination, in phases
    config          the option table, configuration, scenarios
    hosting         host processes and the loopback pair
    tools           bench, speed, endurance, ceilings, fault proxy
    cli             the command line, on top of everything
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

MAY_IMPORT = {
    "hosts": {"hosts"},
    "foundation": {"foundation"},
    "protocol": {"foundation", "protocol"},
    "net": {"foundation", "protocol", "net"},
    "strategies": {"foundation", "strategies", "hosts"},
    "engine": {"foundation", "protocol", "net", "strategies", "engine", "hosts"},
    "config": {"foundation", "protocol", "strategies", "config", "hosts"},
    "hosting": {"foundation", "protocol", "net", "strategies", "engine", "config", "hosting", "hosts"},
    "tools": {"foundation", "protocol", "net", "strategies", "engine", "config", "hosting", "tools", "hosts"},
    "cli": {"foundation", "protocol", "net", "strategies", "engine", "config", "hosting", "tools", "cli", "hosts"},
}
#: modules the protocol core must never import: it takes bytes in and gives bytes and events out
NO_IO = {"asyncio", "socket", "ssl", "selectors", "threading", "subprocess"}
FOUNDATION = {"migrate", "migrate.checksum", "migrate.errors", "migrate.units"}
CLI = {"migrate.cli", "migrate.__main__"}
PACKAGES = ("protocol", "net", "strategies", "engine", "config", "hosting", "tools")


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not ours)."""
    if module == "hosts" or module.startswith("hosts."):
        return "hosts"
    if module in FOUNDATION:
        return "foundation"
    if module in CLI:
        return "cli"
    parts = module.split(".")
    if parts[0] == "migrate" and len(parts) > 1 and parts[1] in PACKAGES:
        return parts[1]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import, relative ones resolved; a
    ``from pkg import name`` counts as importing ``pkg.name`` when that may be
    a module."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every import of ``module`` that its layer may not make, as a sentence."""
    mine = layer_of(module)
    if mine is None:
        return []
    out = []
    for line, target in imports_of(source, module, is_package):
        theirs = layer_of(target)
        if mine == "protocol" and target.split(".")[0] in NO_IO:
            out.append(f"{module}:{line} imports {target}: the protocol core does no I/O")
        if theirs is None or theirs in MAY_IMPORT[mine]:
            continue
        # "from migrate.tools import x" names the package, then the module;
        # report the module-level import once
        out.append(f"{module}:{line} imports {target}: layer {mine} may not reach {theirs}")
    return sorted(set(out))


def sources():
    for top in ("migrate", "hosts"):
        yield from sorted((REPO / top).rglob("*.py"))


def test_no_layer_reaches_up_or_sideways():
    found = []
    for path in sources():
        found += violations(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not found, "\n".join(found)


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside every layer: {unplaced}"


@pytest.mark.parametrize(
    "module, source, complaint",
    [
        ("hosts.kernel", "from migrate.engine import digest", "layer hosts may not reach engine"),
        ("migrate.protocol.frames", "import asyncio", "the protocol core does no I/O"),
        ("migrate.protocol.frames", "from migrate.net.transport import FrameChannel", "may not reach net"),
        ("migrate.engine.source", "from migrate.tools import bench", "layer engine may not reach tools"),
        ("migrate.engine.source", "from ..tools.bench import run", "layer engine may not reach tools"),
        ("migrate.net.transport", "from migrate.engine.pages import BatchStats", "layer net may not reach engine"),
        ("migrate.strategies.prot_mte", "from migrate.protocol import frames", "layer strategies may not reach"),
        ("migrate.hosting.process", "from migrate.cli import main", "layer hosting may not reach cli"),
        ("migrate.tools.speed", "from migrate import cli", "layer tools may not reach cli"),
    ],
)
def test_the_checker_catches_a_planted_import(module, source, complaint):
    found = violations(module, source)
    assert found and any(complaint in f for f in found), found


def test_the_checker_passes_allowed_imports():
    assert violations("migrate.engine.source", "from migrate.net.transport import FrameChannel") == []
    assert violations("migrate.cli", "from migrate.tools.bench import run_bench") == []
    assert violations("migrate.strategies.base", "from hosts.constants import PAGE_SIZE") == []
