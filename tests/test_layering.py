"""The floor plan of docs/architecture.md ("Layers"), checked from the import graph.

Every module of sparse_llama/, configs/ and launch/ is parsed (ast, nothing is imported) and
its project imports are resolved to modules. The rules:
- no import cycle among modules;
- a module imports only its own unit or a unit of a lower floor (`FLOORS`, bottom first);
  units on the same floor (siblings such as distill, sat and adapters) do not import each
  other;
- no function-local import of a project module (it would be there to dodge a cycle), unless
  its line says why with a `# local:` comment.
A unit is a package or top-level module named in `FLOORS`; a new package must be given a floor.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("sparse_llama", "configs", "launch")

# Bottom first. Each entry is one floor; a floor may hold several sibling units.
FLOORS = (
    ("sparse_llama.ground",),  # tree paths, publishing a directory, the XLA cache
    ("sparse_llama.data",),  # sources, tokenizer, grain pipeline
    ("sparse_llama.sparsity",),  # mask pytrees and how weights are chosen for them
    ("sparse_llama.model",),  # config, forward, sharding, the HF checkpoint files
    ("sparse_llama.sparse_io", "sparse_llama.kernels", "sparse_llama.eval",
     "sparse_llama.optim"),  # a sparse model on disk; packed kernels; metrics; optax
    ("sparse_llama.pruning",),  # calibration driver and the one-shot methods
    ("sparse_llama.quant",),  # SmoothQuant, GPTQ, W8A8 (GPTQ is a driver pass)
    ("sparse_llama.loading",),  # the `model` section -> params (packed, quantized)
    ("sparse_llama.train",),  # the Objective contract, state, step, loop, export
    ("sparse_llama.distill", "sparse_llama.sat", "sparse_llama.adapters"),  # objectives
    ("sparse_llama.objectives",),  # the registry of objectives
    ("sparse_llama.commands",),  # the command floor: ConfigDict -> library calls
    ("configs",),  # experiments (never imported by the library)
    ("launch",),  # flags -> a command
)
UNIT_FLOOR = {unit: i for i, floor in enumerate(FLOORS) for unit in floor}
LOCAL_REASON = "# local:"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (None: not a project name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if not MODULES[module].name == "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    return [m for m in map(_resolve, names) if m and m != module]


def _graph():
    """(top-level edges {module: {imported}}, [(module, imported, line)] function-local)."""
    edges, local = {m: set() for m in MODULES}, []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = set()
        for node in tree.body:  # module level, and inside module-level if / try blocks
            stack = [node]
            while stack:
                n = stack.pop()
                if isinstance(n, ast.Import | ast.ImportFrom):
                    top.add(n)
                elif isinstance(n, ast.If | ast.Try):
                    stack.extend(ast.iter_child_nodes(n))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(node, module):
                if node in top:
                    edges[module].add(target)
                elif LOCAL_REASON not in lines[node.lineno - 1]:
                    local.append((module, target, node.lineno))
    return edges, local


def _unit(module: str) -> str:
    for unit in sorted(UNIT_FLOOR, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return module


EDGES, LOCAL = _graph()


def test_every_module_has_a_floor():
    homeless = sorted(m for m in MODULES if _unit(m) not in UNIT_FLOOR and m != "sparse_llama")
    assert not homeless, f"give these a floor in FLOORS (and docs/architecture.md): {homeless}"


def test_no_upward_or_sideways_import():
    bad = []
    for module, targets in EDGES.items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a == b or module == "sparse_llama":
                continue
            if UNIT_FLOOR.get(b, -1) >= UNIT_FLOOR.get(a, -1):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that do not go down a floor:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(m, trail):
        state[m] = "open"
        for t in sorted(EDGES[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(trail[trail.index(t):] + [t]))
            elif t not in state:
                visit(t, trail + [t])
        state[m] = "done"

    for m in sorted(EDGES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_unexplained_function_local_import():
    shown = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for m, t, line in LOCAL]
    assert not shown, (f"function-local project imports (move them to the top, or say why "
                       f"with '{LOCAL_REASON} ...' on the line):\n" + "\n".join(shown))


def test_library_never_imports_configs():
    bad = [f"{m} -> {t}" for m, ts in EDGES.items() for t in ts
           if m.startswith("sparse_llama") and t.startswith("configs")]
    assert not bad, bad


@pytest.mark.parametrize("source, expected_unit", [
    ("sparse_llama.model.llama", "sparse_llama.model"),
    ("sparse_llama.objectives", "sparse_llama.objectives"),
    ("launch.train", "launch"),
])
def test_units_resolve(source, expected_unit):
    # The checks above are only as good as the module -> unit map.
    assert source in MODULES and _unit(source) == expected_unit
