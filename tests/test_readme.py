"""The README's promises: its two commands, CI running the test one, its code examples."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_opens_with_the_two_commands():
    blocks = bash_blocks()
    assert len(blocks) >= 2
    first_code = README.index("```")
    assert README.index("```bash") == first_code
    train, test = blocks[0].strip(), blocks[1].strip()
    assert "pip install -e ." in train
    assert 'pip install -e ".[test]"' in test and "pytest" in test


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = bash_blocks()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_python_examples_run():
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), {})


def _tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", ROOT / "experiments" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return module


def test_results_tables_agree_with_their_json(capsys):
    """Every generated block of README.md and experiments/README.md equals what
    experiments/tables.py renders from experiments/results/*.json."""
    tables = _tables()
    blocks = [m.group("name") for doc in tables.DOCUMENTS for m in tables.BLOCK.finditer(doc.read_text())]
    assert {"routing_summary", "routing_claims", "moe_vs_dense"} <= set(blocks)
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_tables_check_finds_a_stale_number(tmp_path, monkeypatch):
    tables = _tables()
    docs = []
    for doc in tables.DOCUMENTS:
        copy = tmp_path / doc.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(doc.read_text())
        docs.append(copy)
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "DOCUMENTS", tuple(docs))
    assert tables.main(["--check"]) == 0
    text = docs[0].read_text()
    m = tables.BLOCK.search(text)
    body = m.group("body")
    changed = re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), body, count=1)
    docs[0].write_text(text.replace(body, changed, 1))
    assert tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and tables.main(["--check"]) == 0
