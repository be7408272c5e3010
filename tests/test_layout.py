"""The package's shape: imports run one way through the layers the README lists, with no circles and no
function-local imports of jbptt inside the library; estimator files stay one readable algorithm each."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent / "jbptt"

# Lowest first; a module may import only from its own layer or below (README "The pieces").
LAYERS = [
    ("batch", "names"),  # names: plain tuples of the registries' names (no imports)
    ("losses", "ctc", "tasks"),
    ("cells",),
    ("fused",),
    ("unroll",),
    ("estimator",),
    ("estimators",),
    ("remat",),
    ("train",),
    ("parallel", "diagnostics", "seq2seq", "checkpoint"),
    ("testing",),
    ("__init__",),  # the package root re-exports the library
    ("experiment",),
    ("cli", "__main__"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(("jbptt",) + parts), path, (parts[0] if parts else "__init__")


def _jbptt_imports(tree, package: str):
    """``(module, node, top_level)`` for every import of a jbptt module in ``tree``."""
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
            names = [base] + ([f"{base}.{a.name}" for a in node.names] if base == "jbptt" else [])
        for name in names:
            if name.startswith("jbptt.") and not (name == "jbptt" or name.count(".") == 0):
                yield name, node


def _graph():
    mods = {name: (path, top) for name, path, top in _modules()}
    edges, local = {}, []
    for name, (path, top) in mods.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        top_level = {id(n) for n in tree.body}
        for target, node in _jbptt_imports(tree, package):
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name:
                edges.setdefault(name, set()).add(target)
                if id(node) not in top_level and top not in ("cli", "__main__"):
                    local.append((name, target))
    return mods, edges, local


def test_imports_follow_the_layers():
    mods, edges, _ = _graph()
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            s, d = LAYER[mods[src][1]], LAYER[mods[dst][1]]
            if d > s:
                bad.append(f"{src} (layer {s}) imports {dst} (layer {d})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    mods, edges, _ = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in mods:
        if m not in state:
            visit(m, [m])


def test_no_function_local_imports_in_the_library():
    _, _, local = _graph()
    assert not local, f"function-local imports of jbptt modules (they hide cycles): {local}"


@pytest.mark.parametrize("name,limit", [("rtrl", 120), ("bptt", 200), ("tbptt", 200), ("snap", 200),
                                        ("uoro", 200), ("kfrtrl", 200), ("eprop", 200), ("rflo", 200)])
def test_estimator_files_are_short(name, limit):
    lines = len((ROOT / "estimators" / f"{name}.py").read_text().splitlines())
    assert lines <= limit, f"estimators/{name}.py has {lines} lines (limit {limit})"


def test_no_module_is_a_grab_bag():
    long = [(str(p.relative_to(ROOT)), n) for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520]
    assert not long, f"modules over ~500 lines: {long}"
