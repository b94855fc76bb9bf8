"""The import graph of `pafm/`, read from the source (ast): no circle among module-level imports, and a project
import inside a function only where it defers a heavy dependency, with a comment saying which."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pafm"

# Function-local project imports kept without a comment beside them, each with its reason.
ALLOWED = {
    ("pafm.export", "pafm.models"): "timm, only when an export's model is built",
    ("pafm.train", "pafm.models"): "timm, after the config was read: a config error is reported at once",
    ("pafm.train", "pafm.data"): "the datasets, after the config was read: a config error is reported at once",
    ("pafm.train", "pafm.generate"): "diffusers and the decoder, only when a preview grid is drawn",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def project_targets(node, module: str, is_package: bool) -> set[str]:
    """The project modules an import statement loads (a name imported from a package counts as the package, unless
    it is a submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def imports():
    """(module-level edges {module: {imported}}, function-local imports [(module, imported, line, has comment)])."""
    top, local = {}, []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        is_package = path.name == "__init__.py"
        top[module] = set()
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = project_targets(node, module, is_package) - {module}
            if id(node) not in inside:
                top[module] |= targets
                continue
            line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            commented = "#" in line or above.startswith("#")
            local += [(module, target, node.lineno, commented) for target in targets]
    return top, local


def find_cycle(graph: dict) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_reader_sees_circles_and_local_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    top, local = imports()
    assert "pafm.data.shards" in top["pafm.data.validate"] and "pafm.distributed" in top["pafm.cli"]
    assert ("pafm.export", "pafm.models") in {(m, t) for m, t, _, _ in local}


def test_no_import_circle_in_pafm():
    top, _ = imports()
    assert find_cycle(top) is None, " -> ".join(find_cycle(top))


def test_function_local_imports_say_why():
    _, local = imports()
    unexplained = [f"{m}:{line} imports {t}" for m, t, line, commented in local
                   if not commented and (m, t) not in ALLOWED]
    assert not unexplained, unexplained
    unused = set(ALLOWED) - {(m, t) for m, t, _, _ in local}
    assert not unused, f"allowed but no longer imported inside a function: {sorted(unused)}"


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py (fixtures) and helpers.py, so a test module can change alone."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not found, found
