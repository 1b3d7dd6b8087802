"""The layers hold: library subpackages never import the recipes or the CLI, and attention/ knows no model."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparsedistill"
LIBRARY = ("distill", "weights", "attention", "retrieval", "models", "data", "video", "perception")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module under sparsedistill) of every import in a file, at any depth (lazy ones too)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ('sparsedistill', 'retrieval', 'service')
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(parts[: len(parts) - node.level]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_library_modules_import_neither_recipes_nor_cli():
    bad = []
    for sub in LIBRARY:
        for f in sorted((PACKAGE / sub).rglob("*.py")):
            for line, mod in _imports(f):
                if mod.startswith(("sparsedistill.recipes", "sparsedistill.cli")):
                    bad.append(f"{f.relative_to(PACKAGE)}:{line} imports {mod}")
    assert not bad, "library code imports the recipe/CLI layer:\n" + "\n".join(bad)


def test_attention_works_on_tensors_and_imports_no_model():
    bad = [f"{f.relative_to(PACKAGE)}:{line} imports {mod}" for f in sorted((PACKAGE / "attention").rglob("*.py"))
           for line, mod in _imports(f) if mod.startswith("sparsedistill.models")]
    assert not bad, "attention/ imports models/:\n" + "\n".join(bad)


def test_the_check_sees_lazy_relative_imports():
    src = PACKAGE / "retrieval" / "service.py"
    mods = [m for _, m in _imports(src)]
    assert "sparsedistill.retrieval.collection" in mods  # a function-level `from .collection import ...` is resolved and seen


def test_models_need_no_triton():
    """Triton is Linux-only: the models (and the pure-PyTorch attention helpers they use) import without it."""
    import subprocess
    import sys

    code = "import sys, sparsedistill.models, sparsedistill.attention.rope; assert 'triton' not in sys.modules, 'triton'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _subpackage_graph() -> dict[str, set[str]]:
    """Which library subpackage imports which (lazy imports included)."""
    edges: dict[str, set[str]] = {sub: set() for sub in LIBRARY}
    for sub in LIBRARY:
        for f in (PACKAGE / sub).rglob("*.py"):
            for _, mod in _imports(f):
                parts = mod.split(".")
                if len(parts) > 1 and parts[0] == "sparsedistill" and parts[1] in LIBRARY and parts[1] != sub:
                    edges[sub].add(parts[1])
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def walk(path: list[str]) -> None:
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == path[0]:
                found.append(path + [nxt])
            elif nxt not in path:
                walk(path + [nxt])

    for start in edges:
        walk([start])
    return found


def test_no_import_cycle_between_subpackages():
    cycles = _cycles(_subpackage_graph())
    assert not cycles, "import cycles between library subpackages:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) and not _cycles({"a": {"b"}, "b": {"c"}, "c": set()})
