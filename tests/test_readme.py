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


def test_speed_table_reads_gpu_timings_from_the_folder_it_renders(tmp_path):
    """A benchmark timed on a GPU writes one more results file; the speed table shows it when it
    is in the folder being rendered, and only then."""
    import json
    import shutil

    tables = _tables()
    shutil.copy(ROOT / "experiments" / "results" / "bench_qgmm_cpu_interpret.json", tmp_path)
    row = lambda: next(r for r in tables.speed(tmp_path).splitlines() if r.startswith("| Quantized grouped matmul"))
    assert "Not timed yet" in row()
    timing = lambda rows, s: {"rows": rows, **{f"qgmm{b}": {"speedup_vs_gmm": s * b} for b in (4, 8)}}
    gpu = {"device": "GPU X", "E": 8, "d": 64, "f": 128, "group_size": 32, "bits": [4, 8], "decode_rows": 16,
           "goal_met": True, "results": [timing(16, 0.5), timing(4096, 0.25)],
           "layer_decode": [{"tokens": 1, "speedup": 1.5}]}
    (tmp_path / "bench_qgmm_GPU_X.json").write_text(json.dumps(gpu))
    text = row()
    assert "On an GPU X" in text and "4-bit 2.00" in text and "at 4,096 rows 4-bit 1.00x / 8-bit 2.00x" in text
