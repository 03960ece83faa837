"""The package's import graph has no cycles (imports inside functions count: a lazy import only hides a cycle),
and each module imports without the package's ``__init__`` having run first."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"fastvit": ROOT / "fastvit", "fastvit.data": ROOT / "fastvit" / "data", "fastvit.kernels": ROOT / "kernels"}


def modules():
    """Dotted name -> file for every module of the package ('fastvit' is fastvit/__init__.py)."""
    return {pkg if f.stem == "__init__" else f"{pkg}.{f.stem}": f
            for pkg, folder in PACKAGES.items() for f in sorted(folder.glob("*.py"))}


def import_graph():
    """Module -> the package modules it imports anywhere in its file. ``from fastvit import x`` is an edge to the
    submodule fastvit.x when there is one, else to the package itself."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from the importing module's package
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_the_old_registry_circle():
    old = {"fastvit.registry": {"fastvit.model", "fastvit.convert"}, "fastvit.convert": {"fastvit.hybrid"},
           "fastvit.hybrid": {"fastvit.registry", "fastvit.model"}, "fastvit.model": set()}
    assert cycles(old) == [{"fastvit.registry", "fastvit.convert", "fastvit.hybrid"}]


def test_no_import_cycles():
    graph = import_graph()
    assert {"fastvit.registry", "fastvit.pretrained", "fastvit.factory", "fastvit.hybrid"} <= set(graph)
    assert graph["fastvit.registry"] == set(), "the registry is a leaf that model families import"
    assert "fastvit.train" not in graph["fastvit.fewshot"], "the trainer uses few-shot evaluation, never the reverse"
    found = cycles(graph)
    assert not found, f"import cycles: {found}"


def test_each_module_imports_without_the_package_init():
    """A fresh interpreter where 'fastvit' is an empty package object, so each import pulls only what the module
    itself imports; the registry must not even pull torch."""
    code = f"""
import importlib, importlib.util, sys
for pkg, folder in {({k: str(v) for k, v in PACKAGES.items()})!r}.items():
    spec = importlib.util.spec_from_file_location(pkg, folder + "/__init__.py", submodule_search_locations=[folder])
    sys.modules[pkg] = importlib.util.module_from_spec(spec)  # not executed: no __init__ side effects
importlib.import_module("fastvit.registry")
assert "torch" not in sys.modules, "fastvit.registry imported torch"
for name in {sorted(n for n in modules() if n not in PACKAGES)!r}:
    importlib.import_module(name)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
