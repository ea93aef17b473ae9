"""The import graph of the package runs one way: no loops (lazy imports inside functions count), the
library never imports the callbacks or the test helpers, and the model layer never imports the
self-play methods. Read from the source with ``ast``, so a lazy import cannot hide an edge."""

import ast
from pathlib import Path

from tests.helpers import REPO

# Where each package's files are: callbacks/ ships as sppo_lightning.callbacks.
ROOTS = {"sppo_lightning": REPO / "sppo_lightning", "sppo_lightning.callbacks": REPO / "callbacks"}
# The composition root: the command line assembles the callbacks with the rest.
ASSEMBLY = {"sppo_lightning.cli", "sppo_lightning.lightning_cli"}
# The model layer: training modules and what builds their policies.
MODEL_LAYER = {"sppo_lightning.module", "sppo_lightning.bond", "sppo_lightning.policy", "sppo_lightning.policies",
               "sppo_lightning.models", "sppo_lightning.losses", "sppo_lightning.loss_table",
               "sppo_lightning.logprobs", "sppo_lightning.packing", "sppo_lightning.optim"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (importing ``a.b.c`` also
    runs ``a.b``'s ``__init__``: an edge to the package too)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        edges = set()
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            while target:  # the module and every package above it that is not this module's own
                if target in known and target != name and not name.startswith(target + "."):
                    edges.add(target)
                target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_every_module_and_a_loop_when_there_is_one():
    graph = import_graph()
    assert {"sppo_lightning.module", "sppo_lightning.callbacks.self_play", "sppo_lightning.methods.sppo"} <= set(graph)
    assert "sppo_lightning.datamodules.self_play" in graph["sppo_lightning.callbacks.self_play"]
    looped = {**graph, "sppo_lightning.labels": {"sppo_lightning.logprobs"}}  # what a loop looks like
    assert any({"sppo_lightning.labels", "sppo_lightning.logprobs"} <= set(loop) for loop in loops(looped))


def test_no_import_loops_lazy_or_not():
    assert loops(import_graph()) == []


def test_the_library_imports_neither_the_callbacks_nor_the_test_helpers():
    graph = import_graph()
    upward = {name: sorted(t for t in targets if t.startswith("sppo_lightning.callbacks") or t == "sppo_lightning.testing")
              for name, targets in graph.items()
              if name not in ASSEMBLY and not name.startswith("sppo_lightning.callbacks") and name != "sppo_lightning.testing"}
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_the_model_layer_does_not_import_the_methods_or_the_data_modules():
    graph = import_graph()
    above = ("sppo_lightning.methods", "sppo_lightning.datamodules", "sppo_lightning.pipeline")
    reach = {name: sorted(t for t in graph[name] if t.startswith(above)) for name in MODEL_LAYER}
    assert {name: targets for name, targets in reach.items() if targets} == {}


def test_data_modules_and_methods_never_reach_for_the_trainer_s_module_or_callbacks():
    for folder in ("sppo_lightning/datamodules", "sppo_lightning/methods", "sppo_lightning/pipeline"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert "lightning_module" not in text and "trainer.callbacks" not in text, path


def test_test_files_share_helpers_through_one_module_not_through_each_other():
    for folder in ("tests", "tests_real", "tests_vllm"):
        for path in (REPO / folder).glob("*.py"):
            imports = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)]
            assert not [n.module for n in imports if (n.module or "").startswith("tests.test_")], path
