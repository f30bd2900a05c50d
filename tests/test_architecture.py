"""The package's layers, read from the code's own imports (function-local ones included): each package imports only
the packages below it, no module imports a job (main runs them through the registry), there is no import cycle, and
function-local imports are kept for optional heavy dependencies."""

import ast
import functools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "igpt_jax"
LEAVES = {"errors", "workdir", "sharding", "quiet_start"}
# What each layer may import besides itself (the README's "Architecture" section says the same).
ALLOWED = {
    "leaves": set(),
    "data": {"leaves"},
    "reports": {"leaves"},
    "models": {"leaves"},
    "probing": {"leaves", "data", "models", "reports"},
    "config": {"leaves", "data", "models", "probing"},
    "training": {"leaves", "data", "models", "reports", "config"},
    "pretrained": {"leaves", "data", "models", "config", "training"},
    "jobs": {"leaves", "data", "models", "reports", "probing", "config", "training", "pretrained"},
    "main": {"leaves", "config"},
}
# Function-local imports are for optional or heavy dependencies only: torch and transformers (the Hugging Face
# converter), TPU-only code (libtpu's topologies, the Pallas splash kernel), scikit-learn's stack (about 2 s to import
# here, measured with `python -c "import jax, numpy; import sklearn.linear_model"` against `import jax, numpy`; only
# its solver and the digits loader use it) and TFDS's ImageNet catalog module. TensorBoard's writer and reader are
# imported at the top of training/metric_writers.py (0.04-0.14 s after jax here, neither torch nor TensorFlow).
OPTIONAL_HEAVY = {"torch", "transformers", "libtpu", "jax.experimental.pallas.ops.tpu", "jax.experimental.topologies",
                  "sklearn", "scipy", "threadpoolctl", "tensorflow_datasets.datasets",
                  "google.cloud.storage", "google.api_core"}  # the last two: the gs:// lease only


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in LEAVES:
        return "leaves"
    return parts[1]


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported igpt_jax module, whether the import is inside a function) of one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.extend((f"{child.module}.{a.name}", inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The igpt_jax module an imported name refers to (`from igpt_jax.x import y` may name a module or an object)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name and name != "igpt_jax" else None


@functools.cache
def graph() -> dict[str, set[str]]:
    """Module -> the igpt_jax modules it imports (read once per session)."""
    return {m: {t for n, _ in imports_of(p) if n.startswith("igpt_jax") and (t := resolve(n)) and t != m}
            for m, p in MODULES.items()}


def test_every_module_sits_in_a_layer_and_the_top_level_holds_main_and_leaves():
    top = {m.split(".")[1] for m in MODULES if m.count(".") == 1 and (PACKAGE / f"{m.split('.')[1]}.py").exists()}
    assert top == LEAVES | {"main"}
    for module in MODULES:
        if module != "igpt_jax":
            assert layer_of(module) in ALLOWED or module == "igpt_jax.main", module


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "igpt_jax"))
def test_imports_follow_the_layers(module):
    layer = "main" if module == "igpt_jax.main" else layer_of(module)
    for target in graph()[module]:
        other = layer_of(target)
        if target.startswith("igpt_jax.jobs."):
            assert False, f"{module} imports the job {target}: jobs are run through the registry, never imported"
        assert other == layer or other in ALLOWED[layer], f"{module} ({layer}) imports {target} ({other})"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])


def test_function_local_imports_are_only_for_optional_heavy_dependencies():
    offenders = []
    for module, path in MODULES.items():
        for name, local in imports_of(path):
            if local and not any(name == h or name.startswith(h + ".") for h in OPTIONAL_HEAVY):
                offenders.append(f"{module}: {name}")
    assert not offenders, offenders


def test_the_architecture_is_described_in_the_readme_and_each_package_docstring():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for layer in ALLOWED:
        if layer not in ("leaves", "main"):
            assert re.search(rf"`{layer}/`", section), layer
            assert (PACKAGE / layer / "__init__.py").read_text().strip().startswith('"""'), layer
            assert "May import" in (PACKAGE / layer / "__init__.py").read_text(), layer
