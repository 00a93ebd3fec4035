"""Dependencies point one way: pipeline -> cache_format <- trainer."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> set[str]:
    roots = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_cache_format_imports_no_torch_vllm_or_project_packages():
    assert not imported_roots("cache_format") & {"torch", "vllm", "transformers", "pipeline", "trainer"}
    code = "import sys, cache_format; bad = {'torch', 'vllm', 'transformers'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "set()"


def test_trainer_never_imports_pipeline():
    assert "pipeline" not in imported_roots("trainer")


def test_only_the_engine_module_imports_vllm():
    for path in (ROOT / "pipeline").rglob("*.py"):
        if "vllm" in {n.split(".")[0] for n in _imports(path)}:
            assert path.name == "teachers.py", f"{path} imports vllm"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names
