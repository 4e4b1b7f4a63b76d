"""The package reads as the process: data flows one way through layers, with no import cycle, no private name
imported across modules, and no file past a readable size.

The layers, lowest first (a module imports only from its own layer or below):

    core        errors, mirror
    model       the network;  tokenizer: text to tokens
    artifacts   data (shards, loader), checkpoint (folders), runtime (device, distributed context)
    interop     Hugging Face folders, --model specs, which tokenizer goes with what
    engines     train (the loop, optimizers, parallelism), inference (KV caches, sampling, the batching engine)
    stages      eval, chat, sft, rl
    surfaces    serve, report
    commands    config (composes every stage's section), cli, bench, and each stage's command module

Training a tokenizer reads the data sources, so ``tokenizer/train.py`` sits on the data's layer.

Imports inside ``if TYPE_CHECKING:`` are type hints only and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src" / "gpt2lab"
LAYERS = {
    "errors": 0, "mirror": 0,
    "model": 1, "tokenizer": 1,
    "data": 2, "checkpoint": 2, "runtime": 2,
    "interop": 3,
    "train": 4, "inference": 4,
    "eval": 5, "chat": 5, "sft": 5, "rl": 5,
    "serve": 6, "report": 6,
    "config": 7, "cli": 7, "bench": 7, "speedrun": 7, "__main__": 7,
}  # fmt: skip
MODULE_LAYERS = {"tokenizer.train": LAYERS["data"]}  # trains on the data sources (see above)
COMMANDS = {"train.command", "train.ablate", "sft.command", "rl.command", "eval.commands"}  # compose configs: top
# Upward imports that remain, each to go in a later step of the layout issue. A new one fails the test; one that
# goes away must leave this list too. (The loop is given its objective by each stage's command: none left.)
KNOWN_UPWARD: set[tuple[str, str]] = set()
TOO_LONG: set[str] = set()  # files past MAX_LINES still to split
MAX_LINES = 500


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer(module: str) -> int:
    if module in COMMANDS:
        return LAYERS["config"]
    return MODULE_LAYERS.get(module, LAYERS[module.split(".")[0]])


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement but those under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]


def imports() -> dict[str, set[str]]:
    """{module: the gpt2lab modules it imports} (``from gpt2lab.pkg import mod`` counts as pkg.mod)."""
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        me = module_name(path)
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.module and node.module.startswith("gpt2lab"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t.removeprefix("gpt2lab.") in modules else node.module for t in targets]
            else:
                continue
            for t in targets:
                name = t.removeprefix("gpt2lab.").removeprefix("gpt2lab")
                if t.startswith("gpt2lab") and name and name != me:
                    graph[me].add(name)
    return graph


def test_every_module_has_a_layer():
    assert {m.split(".")[0] for m in imports()} <= LAYERS.keys()


def test_no_module_imports_a_higher_layer():
    upward = {(m, t) for m, ts in imports().items() for t in ts if layer(t) > layer(m)}
    assert upward <= KNOWN_UPWARD, f"new imports that run up the layers: {sorted(upward - KNOWN_UPWARD)}"
    gone = {pair for pair in KNOWN_UPWARD - upward if layer(pair[1]) > layer(pair[0])}
    assert not gone, f"these upward imports are gone: take them off KNOWN_UPWARD: {sorted(gone)}"


def test_the_model_imports_nothing_above_it():
    for m, targets in imports().items():
        if m.startswith("model"):
            assert all(t.startswith("model") for t in targets), f"{m} imports {targets}"


def test_no_import_cycle():
    graph = imports()
    seen, stack, on_stack, cycles = {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        seen[node] = low = len(seen)
        stack.append(node)
        on_stack.add(node)
        lows[node] = low
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                visit(nxt)
                lows[node] = min(lows[node], lows[nxt])
            elif nxt in on_stack:
                lows[node] = min(lows[node], seen[nxt])
        if lows[node] == seen[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    lows: dict[str, int] = {}
    for node in list(graph):
        if node not in seen:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{module_name(p)} imports {a.name} from {n.module}"
        for p in SRC.rglob("*.py")
        for n in _runtime_imports(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("gpt2lab")
        for a in n.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, private


def test_files_stay_a_readable_size():
    long = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    over = {name for name, n in long.items() if n > MAX_LINES}
    assert over <= TOO_LONG, f"past {MAX_LINES} lines: {sorted(over - TOO_LONG)}"
    assert not TOO_LONG - over, f"now short enough, take them off TOO_LONG: {sorted(TOO_LONG - over)}"
