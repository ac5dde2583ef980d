"""The layer rule of docs/architecture.md, checked on the source: engine <- model pieces <- Lightning <- entry points.

Each module of ``zo2_lightning`` imports only from its own layer or the ones below, the lower layers never import
the frameworks above them (the engine is plain torch; nothing below the entry points imports Hydra), and the
package's module-level imports have no cycle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zo2_lightning"

#: layer of each module, by the first matching prefix (most specific first)
LAYERS = [
    ("zo2_lightning.engine", 0),
    ("zo2_lightning.module", 1), ("zo2_lightning.optim", 1), ("zo2_lightning.methods", 1), ("zo2_lightning.peft", 1),
    ("zo2_lightning.policies", 1), ("zo2_lightning.models", 1),
    ("zo2_lightning.strategy", 2), ("zo2_lightning.tasks", 2), ("zo2_lightning.callbacks", 2),
    ("zo2_lightning._registration", 2),
    ("zo2_lightning.train", 3), ("zo2_lightning.eval", 3), ("zo2_lightning.config", 3),
    ("zo2_lightning.reproduce", 3),
    ("zo2_lightning", 2),  # the package root: the public face (lazy strategy import, registration)
]
#: frameworks a layer may not import: the engine is plain torch, Hydra lives only in the entry points
FORBIDDEN = {
    0: {"lightning", "pytorch_lightning", "hydra", "omegaconf", "transformers", "torchmetrics"},
    1: {"lightning", "pytorch_lightning", "hydra", "omegaconf", "torchmetrics"},
    2: {"hydra", "omegaconf"},
    3: set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer in LAYERS: add it")


def _imports(path: Path, modules: dict[str, Path], top_level_only: bool) -> list[str]:
    """What a file imports: package modules by name (``from a import b`` counts ``a.b`` when it is a module),
    other packages by their top-level name."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(sub if sub in modules else node.module)
    return found


def test_every_module_imports_only_its_own_layer_and_the_ones_below():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        layer = _layer(name)
        for imported in _imports(path, modules, top_level_only=False):
            top = imported.split(".")[0]
            if top == "zo2_lightning":
                if _layer(imported) > layer:
                    wrong.append(f"{name} (layer {layer}) imports {imported} (layer {_layer(imported)})")
            elif top in FORBIDDEN[layer]:
                wrong.append(f"{name} (layer {layer}) imports {top}")
    assert not wrong, "\n".join(wrong)


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(path, modules, top_level_only=False) if m in modules and m != name}
             for name, path in modules.items()}
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


@pytest.mark.parametrize("module,banned", [
    ("zo2_lightning.engine", ("lightning", "pytorch_lightning", "hydra", "omegaconf")),
    ("zo2_lightning", ("lightning", "hydra", "omegaconf")),
    ("zo2_lightning.strategy", ("hydra", "omegaconf")),
    ("zo2_lightning.tasks.lm_task", ("hydra", "omegaconf")),
], ids=["engine", "package", "strategy", "lm_task"])
def test_importing_a_layer_loads_no_framework_above_it(module, banned):
    code = (
        f"import sys, {module};"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {banned!r}];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
