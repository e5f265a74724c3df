"""The package layout shows the architecture (docs/architecture.md): the build's stages and its
inputs never reach up into curation, the app or the service, and no import circle exists
between the package's modules (issue 16)."""

import ast
from pathlib import Path

import explorer

ROOT = Path(explorer.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("explorer", *p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, module_level: bool) -> set[str]:
    """The explorer modules ``name`` imports (all of them, or those run at import time:
    not inside functions, not under ``if TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def add(node):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)

    def visit(body):
        for node in body:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With,)):
                visit(node.body)
            else:
                add(node)

    tree = ast.parse(path.read_text(encoding="utf-8"))
    if module_level:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            add(node)
    return {m for m in found if m.startswith("explorer")}


def test_no_import_circle_between_the_package_modules():
    """Only imports run at import time count (a function-level import breaks no circle).
    Proven able to fail: ``from explorer.stages.embed import EmbedResult`` added at the top of
    explorer/stages/models.py fails here with embed -> models -> embed."""
    mods = _modules()
    graph = {m: {d for d in _imports(m, p, module_level=True) if d in mods and d != m}
             for m, p in mods.items()}
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    circles.append(sorted(comp))
    assert circles == []


def test_the_build_and_its_inputs_never_import_curation_the_app_or_the_service():
    """stages/ and inputs/ are what `explorer build` runs; curation/, app/ and service/ act on
    a finished build. Proven able to fail: sources.py took a column name from exports.py."""
    above = ("explorer.curation", "explorer.app", "explorer.service")
    wrong = {}
    for name, path in _modules().items():
        if name.startswith(("explorer.stages", "explorer.inputs")):
            up = sorted(m for m in _imports(name, path, module_level=False)
                        if m.startswith(above))
            if up:
                wrong[name] = up
    assert wrong == {}


def test_the_sub_packages_are_installed():
    """pyproject's package discovery finds the sub-packages (a wheel without them would
    install an `explorer` whose build cannot import its stages)."""
    import tomllib

    from setuptools import find_packages

    conf = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    include = conf["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT.parent), include=include))
    assert {"explorer", "explorer.stages", "explorer.stages.engines", "explorer.inputs",
            "explorer.curation", "explorer.app", "explorer.service"} <= found
