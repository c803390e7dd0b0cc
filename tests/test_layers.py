"""The package picture of docs/architecture.md, checked against the imports in the code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "easyspec"

# A package may import those of lower layers (and, one way only, its own layer's), never higher ones.
LAYERS = {
    "cli": 5, "server": 5, "bench": 5, "zoo": 5, "distill": 5,
    "engine": 4,
    "draft": 3,
    "runtime": 2, "verify": 2, "parallel": 2,
    "model": 1,
    "options": 0,
}
# The CLI builds one parser: it imports each front end's `register`, and they use its shared flags.
REGISTRATION = {("cli", "bench"), ("cli", "server"), ("cli", "distill"), ("bench", "cli"), ("server", "cli"),
                ("distill", "cli")}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "easyspec" and len(parts) > 1 else None


def package_edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import between packages, lazy (in-function) imports included."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        source = package_of(".".join(rel.parts))
        if source is None or source in ("__init__", "__main__"):
            continue  # the package root re-exports the public API
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                target = package_of(name)
                if target is not None and target != source:
                    edges.add((source, target))
    return edges


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} | {"options"}
    assert packages == set(LAYERS)


def test_imports_point_down_and_no_two_packages_import_each_other():
    """One exception: the CLI and the front ends whose subcommands it registers."""
    edges = package_edges()
    upward = sorted(e for e in edges - REGISTRATION if LAYERS[e[0]] < LAYERS[e[1]])
    assert upward == []
    mutual = sorted(e for e in edges - REGISTRATION if (e[1], e[0]) in edges)
    assert mutual == []
    assert ("draft", "engine") not in edges and ("engine", "draft") in edges


def test_options_and_the_cli_parser_load_without_torch():
    code = ("import sys; import easyspec.options; from easyspec.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    assert out.strip() == "[]"
