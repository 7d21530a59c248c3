"""The documentation site builds with warnings as errors, and every public function and class
of the documented modules has a docstring."""

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted({m for f in (ROOT / "docs" / "api").glob("*.md") for m in re.findall(r"^::: (\S+)", f.read_text(), re.M)})


@pytest.mark.slow
def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    text = lambda page: html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site" / page).read_text()))
    index = text("index.html")
    assert "jmoe train --preset tiny" in index and "python -m pytest -q" in index  # the README commands
    assert "bench_moe_layer.py" in index and "merge_then_compress.py" in index  # results with their commands
    api = text("api/layer/index.html")
    assert "moe_layer" in api and "[E, d, f]" in api


@pytest.mark.parametrize("name", MODULES)
def test_public_api_has_docstrings(name):
    mod = importlib.import_module(name)
    assert (mod.__doc__ or "").strip(), f"module {name} has no docstring"
    missing = [attr for attr, obj in vars(mod).items()
               if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
               and getattr(obj, "__module__", None) == name and not (obj.__doc__ or "").strip()]
    assert not missing, f"{name}: no docstring on {', '.join(missing)}"
