"""The layering is `pipeline -> trainer -> cache_format` (DESIGN.md): cache_format imports neither package nor
torch/vllm, trainer never imports pipeline, only pipeline/teachers.py imports vllm, and no module imports itself
back through others (no cycle, counting imports inside functions too)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_format", "trainer", "pipeline")
LAYER = {"cache_format": 0, "trainer": 1, "pipeline": 2}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved, at any depth of the file."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)     # `from pkg import module`
    return names


def project_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: {n for n in imports(p) if n in files and n != m} for m, p in files.items()}


def test_dependencies_point_one_way():
    for module, deps in project_graph().items():
        for dep in deps:
            src, dst = module.split(".")[0], dep.split(".")[0]
            assert LAYER[dst] <= LAYER[src], f"{module} imports {dep}: {src} must not depend on {dst}"


def test_no_import_cycle():
    graph = project_graph()
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}  # a package's own
    state: dict[str, int] = {}                                                             # __init__ re-exports

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path[path.index(d):] if d in path else path)} -> {d}"
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.slow
def test_cache_format_imports_no_torch_vllm_or_project_packages():
    roots = {n.split(".")[0] for p in (ROOT / "cache_format").rglob("*.py") for n in imports(p)}
    assert not roots & {"torch", "vllm", "transformers", "pipeline", "trainer"}
    code = "import sys, cache_format; bad = {'torch', 'vllm', 'transformers'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "set()"


def test_only_the_engine_module_imports_vllm():
    for path in (ROOT / "pipeline").rglob("*.py"):
        if "vllm" in {n.split(".")[0] for n in imports(path)}:
            assert path.name == "teachers.py", f"{path} imports vllm"


def test_the_checker_sees_a_cycle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The two rules above can fail: a file-level cycle and a trainer -> pipeline import are both found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from .b import x\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline.a import y\n")
    (tmp_path / "trainer" / "t.py").write_text("from pipeline import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for check, message in ((test_no_import_cycle, "import cycle"), (test_dependencies_point_one_way, "must not")):
        try:
            check()
        except AssertionError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{check.__name__} missed it")
