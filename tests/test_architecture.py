"""The shape of the tree, checked from the source alone (``ast``, nothing is imported):

* no import cycle among the modules of ``zoo/`` — function-local imports count, a lazy import is
  still a dependency;
* no import from ``zoo.data`` into ``zoo/models`` or ``zoo/training.py`` (data modules load and
  shape data; models and the training code reach them through the datamodule objects they are given);
* no hook discovery in ``zoo/training.py`` / ``zoo/evaluation.py``: the optional hooks are declared
  on the base classes and called plainly, never probed with ``hasattr`` / ``getattr``;
* no module over ~400 lines without the reason stated at its top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "zoo"
HOOKS = {"report_rows", "image_report_rows", "explanation_variants", "card_metrics", "export", "reference_rows",
         "model_kwargs", "input_kind", "contrast_images"}
LONG = 420  # "~400 lines": a module longer than this states why at its top
LONG_REASON = "over 400 lines"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package __init__)."""
    out = {}
    for path in sorted(ZOO.rglob("*.py")):
        parts = list(path.relative_to(ZOO.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _owner(name: str, known: dict) -> str | None:
    """The zoo module an imported dotted name lives in (the longest known prefix)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """module → {imported zoo module: line of the first such import}, every import statement counted
    (module level or inside a function). ``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in known.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            for target in targets:
                if target == "zoo" or target.startswith("zoo."):
                    owner = _owner(target, known)
                    if owner is not None and owner != name:
                        edges.setdefault(owner, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_the_tree():
    graph = import_graph()
    assert {"zoo.base", "zoo.training", "zoo.evaluation", "zoo.data.graphs"} <= set(graph)
    assert "zoo.registry" in graph["zoo.base"] or "zoo.explanation" in graph["zoo.base"]  # it reads imports
    # and it finds a cycle where there is one (two modules importing each other, one lazily)
    assert cycles({"a": {"b": 1}, "b": {"a": 3}, "c": {"a": 1}}) == [["a", "b"]]


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    detail = ["  " + " ↔ ".join(c) + ": " + "; ".join(f"{m} → {t} (line {graph[m][t]})" for m in c for t in graph[m]
                                                    if t in c) for c in found]
    assert not found, "import cycles in zoo/:\n" + "\n".join(detail)


def test_models_and_training_never_import_the_data_layer():
    graph = import_graph()
    upward = [f"{m} → {t} (line {line})" for m, edges in graph.items() for t, line in edges.items()
              if (t == "zoo.data" or t.startswith("zoo.data.")) and (m.startswith("zoo.models") or m == "zoo.training")]
    assert not upward, "imports from zoo.data into zoo/models or zoo/training.py:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("module", ["training.py", "evaluation.py"])
def test_no_hook_discovery(module):
    tree = ast.parse((ZOO / module).read_text())
    probes = [f"line {n.lineno}: {n.func.id}(…, {n.args[1].value!r})" for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
              and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and n.args[1].value in HOOKS]
    assert not probes, f"zoo/{module} probes for hooks the base classes declare: {probes}"


def test_every_hook_is_declared_on_a_base_class():
    from zoo.base import SelfExplainingModule
    from zoo.data.common import BaseDataModule

    declared = set(dir(SelfExplainingModule)) | set(dir(BaseDataModule))
    assert HOOKS <= declared, f"hooks without a default: {sorted(HOOKS - declared)}"


def test_long_modules_say_why():
    unexplained = []
    for path in sorted(ZOO.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > LONG and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(ZOO.parent)} ({text.count(chr(10))} lines)")
    assert not unexplained, (f"modules over {LONG} lines without '{LONG_REASON}' and the reason in their "
                             f"docstring: {unexplained}")
