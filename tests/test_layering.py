"""The import graph's layering: the packages below ``quantize`` never import it, and no module cycle exists.

Every ``import`` / ``from ... import`` statement of every module under jquant/, models/ (``jquant.models``) and
pallas_kernels/ (``jquant.pallas_kernels``) is read with ``ast``, function-local ones included: a lazy import
that only hides a circle is still a circle. Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from a.b import c`` is an edge to the module ``a.b.c`` when that
module exists, else to ``a.b``; importing a module is not counted as importing its parent packages' ``__init__``
(every import would otherwise reach ``jquant/__init__.py``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"jquant": ROOT / "jquant", "jquant.models": ROOT / "models", "jquant.pallas_kernels": ROOT / "pallas_kernels"}

# The layers below ``jquant.quantization.quantize``: what quantize composes, so none of them may import it.
BELOW_QUANTIZE = {
    "jquant.formats": "number formats and QArray: pure data, the bottom of the stack",
    "jquant.numerics": "Hadamard matrices, k-means: numerical building blocks with no jquant dependency",
    "jquant.ops": "the compute boundary the models call; knows formats, never how weights were produced",
    "jquant.calib": "calibration statistics capture and the block-by-block driver quantize runs",
    "jquant.algorithms": "per-site weight algorithms (GPTQ, GPTVQ, PCDVQ, ...) that quantize dispatches to",
    "jquant.kv": "KV-cache configs, quantizers and methods; quantize sets the cache format from a recipe",
    "jquant.transforms": "equivalence transforms that recipes run as steps inside quantize",
    "jquant.sites": "the quantizable-weight declarations quantize walks",
    "jquant.recipes": "the rules quantize resolves; pure data",
}
QUANTIZE_MODULE = "jquant.quantization"
# The format registry and the formats it names are one unit (the registry builds every named format; a format's
# ``name`` parses through it), so cycles inside jquant.formats are allowed.
CYCLES_ALLOWED_INSIDE = "jquant.formats"


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(part.startswith(".") for part in parts):
                continue
            found[".".join([prefix, *parts])] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target == "models" or target.startswith("models."):
                    target = "jquant." + target  # the source-tree name of jquant.models
                if target == "pallas_kernels" or target.startswith("pallas_kernels."):
                    target = "jquant." + target
                resolved = resolve(target)
                if resolved is not None and resolved != module:
                    edges.add(resolved)
        graph[module] = edges
    return graph


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component (of more than one module), as a module chain."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    chains = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first search inside the component for the shortest path back to start
        parents, frontier, seen, end = {}, [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        parents[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        chain = [start]
        v = end
        while v != start:
            chain.insert(1, v)
            v = parents[v]
        chains.append([*chain, start] + ([f"(component: {', '.join(component)})"] if len(component) > len(chain) else []))
    return chains


def test_graph_sees_every_package():
    graph = _import_graph()
    for package in [*BELOW_QUANTIZE, QUANTIZE_MODULE, "jquant.models.llama", "jquant.pallas_kernels.registry"]:
        assert package in graph, package
    assert "jquant.formats.qarray" in graph["jquant.formats.api"]  # edges are found


def test_nothing_below_quantize_imports_it():
    graph = _import_graph()
    offenders = sorted(
        f"{module} imports {QUANTIZE_MODULE}"
        for module, edges in graph.items()
        if any(_in_package(module, package) for package in BELOW_QUANTIZE) and QUANTIZE_MODULE in edges
    )
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_outside_formats():
    graph = _import_graph()
    chains = [
        chain for chain in _cycles(graph) if not all(_in_package(m, CYCLES_ALLOWED_INSIDE) for m in chain if not m.startswith("("))
    ]
    assert not chains, "import cycles:\n" + "\n".join(" -> ".join(chain) for chain in chains)
