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


# ------------------------------------------------------------------------------------------------ one home per name
SOURCES = {_module(p): p.read_text(encoding="utf-8") for p in sorted(PKG.rglob("*.py"))}
# what may touch sys.modules: the import machinery (post-import hooks; peft imported without bitsandbytes)
SYS_MODULES = {"lpt.quiet", "lpt.int8"}


def _sys_modules_uses(tree: ast.Module) -> list[ast.Attribute]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "modules"
            and isinstance(n.value, ast.Name) and n.value.id == "sys"]


def _lpt_keys(tree: ast.Module) -> list[str]:
    """String keys starting with ``lpt`` looked up in ``sys.modules`` (``sys.modules.get("lpt.x")``,
    ``sys.modules["lpt.x"]``): another module's state read behind the import graph's back."""
    keys = []
    for n in ast.walk(tree):
        arg = None
        if isinstance(n, ast.Subscript) and n.value in _sys_modules_uses(tree):
            arg = n.slice
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.value in _sys_modules_uses(tree):
            arg = n.args[0] if n.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.split(".")[0] == "lpt":
            keys.append(arg.value)
    return keys


def _top_level_names(tree: ast.Module) -> dict[str, str]:
    """Names a module imports from another lpt module at its top: name -> where from."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lpt":
            for a in node.names:
                out[a.asname or a.name] = node.module
    return out


def test_the_walk_sees_sys_modules_peeking_and_re_exports():
    peek = ast.parse("import sys\n\ndef f():\n    return sys.modules.get('lpt.cli._common')\n")
    assert _lpt_keys(peek) == ["lpt.cli._common"] and _sys_modules_uses(peek)
    shim = ast.parse("from lpt.masks import Masks  # noqa: F401\n")
    assert _top_level_names(shim) == {"Masks": "lpt.masks"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_sys_modules_peeking(module):
    """State is read through imports (``lpt.quiet.debug()``), never by looking a module up in ``sys.modules``."""
    assert not _lpt_keys(MODULES[module]), f"{module} reads {_lpt_keys(MODULES[module])} through sys.modules"
    assert module in SYS_MODULES or not _sys_modules_uses(MODULES[module]), \
        f"{module} touches sys.modules; only the import machinery ({', '.join(sorted(SYS_MODULES))}) does"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(("lpt.benchmarking", "lpt.cli"))
                                          and m != "lpt.stages.bench"))
def test_only_the_bench_stage_imports_benchmarking(module):
    """``lpt.benchmarking`` is lpt bench's: the library measures device memory with ``lpt.memory``."""
    names = {n for n in _imports(MODULES[module], module) if n == "lpt.benchmarking" or n.startswith("lpt.benchmarking.")}
    assert not names, f"{module} imports {sorted(names)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_re_export_shims(module):
    """Every name lives in one module and is imported from there: a module imports another lpt module's names only
    to use them (no ``noqa: F401`` re-exports left behind after a move)."""
    assert "noqa: F401" not in SOURCES[module], f"{module} silences an unused import (a re-export shim?)"
    tree = MODULES[module]
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    unused = sorted(name for name in _top_level_names(tree) if name not in used)
    assert not unused, f"{module} imports {unused} without using them (import them from their own module)"
