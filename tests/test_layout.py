"""The library's layout stays one a reader can hold in their head (README, "The library").

Each idea of the paper has one home; the MiniGPT-4 core never reaches into the ToyWorld factory,
the command line, the widgets or the plots; no module imports another that imports it back.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt4_lite"
# The MiniGPT-4 core: the modules that implement the paper (README, "The library")...
CORE = ("config", "vision", "qformer", "model", "prompts", "data", "train", "resume", "chat",
        "checkpoints", "processing")
# ...and what it leans on without any idea of the paper in them: errors, safe image files, and
# the performance switches (none of them imports the core)
SUPPORT = ("errors", "images", "speed", "hub")
CORE_BUDGET = 2500  # lines, the modules of `CORE` together
MODULE_BUDGET = 450  # lines, any module
OUTSIDE_THE_CORE = ("toyworld", "cli", "widgets", "viz", "interpret", "pipeline", "curate",
                    "evaluate", "prepare", "infer", "stream", "downloads")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below it: "model", "toyworld.build", and a
    subpackage's `__init__.py` by the subpackage's name ("toyworld"); the package's own is "".
    """
    found = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The package's modules that `name` imports (relative or absolute imports)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:  # `if TYPE_CHECKING:` imports are for annotations only: not imports
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            tree.body.remove(node)
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = [p for p in name.split(".") if p]
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("minigpt4_lite"):
                target = node.module.removeprefix("minigpt4_lite").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import toyworld` names a module, not an attribute
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in modules() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("minigpt4_lite.") for a in node.names
                      if a.name.startswith("minigpt4_lite.")}
    return {f for f in found if f}


def test_the_core_is_small_and_no_module_is_long():
    mods = modules()
    core = sum(lines(mods[m]) for m in CORE)
    assert core <= CORE_BUDGET, f"the MiniGPT-4 core has {core} lines (> {CORE_BUDGET})"
    long = {m: lines(p) for m, p in mods.items() if lines(p) > MODULE_BUDGET}
    assert not long, f"modules over {MODULE_BUDGET} lines: {long}"


def test_every_module_says_what_it_holds():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 40, f"{name} has no opening docstring"


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_outside_it(core):
    mods = modules()
    used = imports(core, mods[core])
    outside = {m for m in used if m.split(".")[0] in OUTSIDE_THE_CORE}
    assert not outside, f"{core} imports {sorted(outside)}"
    assert used <= set(CORE) | set(SUPPORT), f"{core} imports {sorted(used)}"


@pytest.mark.parametrize("support", SUPPORT)
def test_the_support_modules_know_nothing_of_minigpt4(support):
    used = imports(support, modules()[support])
    assert used <= set(SUPPORT), f"{support} imports {sorted(used)}"


def test_no_import_circles():
    mods = modules()
    graph = {name: {m for m in imports(name, path, top_level_only=True) if m in mods} - {name}
             for name, path in mods.items()}

    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:  # depth first; `path` is the current chain
        for nxt in sorted(graph.get(node, ())):
            assert nxt not in path, f"import circle: {' -> '.join(path + [nxt])}"
            if nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])


def test_no_function_imports_a_module_of_the_package_to_dodge_a_circle():
    """Imports inside functions are for optional, heavy packages, never for our own modules
    (that would hide a circle). The command line imports lazily to start fast: it is exempt."""
    for name, path in modules().items():
        if name in ("cli", "__main__"):
            continue
        inner = imports(name, path) - imports(name, path, top_level_only=True)
        assert not inner, f"{name} imports {sorted(inner)} inside a function"
