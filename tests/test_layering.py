"""The layering of the package, read from the source: stages are leaves (only the CLI imports them, and no stage
imports another), and the CLI's modules import at their top only what keeps ``lpt --help`` light."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lpt"
# what a module of lpt/cli may import at its top (the rest inside the command functions, when a command runs)
CLI_TOP = {"lpt", "lpt.cli", "lpt.cli._common", "lpt.config", "lpt.errors"}


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, top_only: bool = False) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``tree`` names (function-level ones too, unless
    ``top_only``), with ``from lpt import x`` counted as ``lpt.x``."""
    nodes = tree.body if top_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: relative import (lpt imports absolutely, so this test can read it)"
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


MODULES = {_module(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PKG.rglob("*.py"))}


def _stage_imports(names: set[str]) -> set[str]:
    return {n for n in names if n == "lpt.stages" or n.startswith("lpt.stages.")}


def test_the_walk_sees_function_level_imports():
    tree = ast.parse("def f():\n    from lpt.stages import prune\n\n\nimport os\n")
    assert "lpt.stages.prune" in _imports(tree, "lpt.x")
    assert _imports(tree, "lpt.x", top_only=True) == {"os"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(("lpt.cli", "lpt.stages"))))
def test_the_library_never_imports_a_stage(module):
    assert not _stage_imports(_imports(MODULES[module], module)), \
        f"{module} imports a stage; move what it needs into the library"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("lpt.stages.")))
def test_stages_do_not_import_each_other(module):
    assert not _stage_imports(_imports(MODULES[module], module)), \
        f"{module} imports a stage; helpers two stages share belong in the library"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("lpt.cli")))
def test_the_cli_imports_configs_not_stages_at_its_top(module):
    top = {n for n in _imports(MODULES[module], module, top_only=True) if n.split(".")[0] == "lpt"}
    heavy = {n for n in _imports(MODULES[module], module, top_only=True) if n.split(".")[0] in ("torch", "transformers")}
    # `from lpt.config import PruneConfig` names the module and the class: only the modules count
    top = {n for n in top if n in MODULES or n == "lpt"}
    assert top <= CLI_TOP and not heavy, f"{module} imports {sorted(top - CLI_TOP) or sorted(heavy)} at its top"
