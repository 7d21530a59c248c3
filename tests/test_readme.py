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


def test_speed_table_has_one_row_per_device_a_benchmark_ran_on(tmp_path):
    import json

    tables = _tables()
    mfu = lambda: [r for r in tables.speed(tmp_path).splitlines() if "preset on an" in r]
    (tmp_path / "bench_train_mfu_cpu.json").write_text("{}")  # a CPU run checks the script only
    assert mfu() == [] and "| a training step of the `base` preset on one GPU" in tables.speed(tmp_path)
    run = {"command": "python experiments/bench_train_mfu.py", "preset": "base", "batch": 8, "seq_len": 2048,
           "model": {"moe": {"num_experts": 64, "top_k": 6}}, "active_params": 250e6, "total_params": 1.3e9,
           "step_s": 0.5, "step_s_range": [0.49, 0.52], "steps_timed": 10, "tokens_per_s": 32768.0,
           "model_flops_per_step": 2.5e14, "peak_bf16_flops": 989e12, "mfu": 0.5055, "mfu_vs_matmul": 0.62,
           "matmul_tflops": 800.0, "maxtext_mixtral_mfu": 0.549, "losses_finite": True}
    for device in ("GPU_A", "GPU_B"):
        (tmp_path / f"bench_train_mfu_{device}.json").write_text(json.dumps({**run, "device": device.replace("_", " ")}))
    rows = mfu()
    assert len(rows) == 2 and "on an GPU A" in rows[0] and "on an GPU B" in rows[1]
    assert "500.0 ms per step" in rows[0] and "MFU 50.5%" in rows[0] and "500 model TFLOP/s" in rows[0]
    assert "not measured yet (run `python experiments/bench_train_mfu.py`)" not in tables.speed(tmp_path)


def test_speed_table_renders_gpu_decoding_and_offloading(tmp_path):
    import json

    tables = _tables()
    case = lambda b, tok, share: {"batch": b, "decode_tokens_per_s": tok, "decode_step_s": b / tok,
                                  "prefill_tokens_per_s": 9000.0, "bytes_per_step": {"total": 2.9e9},
                                  "achieved_bytes_per_s": 2.9e9 * tok / b, "device_bytes_per_s": 4.8e12,
                                  "bandwidth_share": share}
    decode = {"command": "python experiments/bench_decode.py --gpu", "device_kind": "GPU X", "n_layers": 40,
              "weights_bytes": 118e9, "cases": [case(1, 1000.0, 0.604), case(32, 20000.0, 0.9)]}
    (tmp_path / "bench_decode_gpu.json").write_text(json.dumps(decode))
    row = next(r for r in tables.speed(tmp_path).splitlines() if "Mixtral-shaped bf16 model (random" in r)
    assert "batch 1: decode 1,000.0 tokens/s (1.00 ms per step reading 2.9 GB: 2,900 GB/s = 60.4% of" in row
    assert "(at least 60% of the HBM bandwidth): met" in row
    decode["cases"][0]["bandwidth_share"] = 0.55
    (tmp_path / "bench_decode_gpu.json").write_text(json.dumps(decode))
    assert "bandwidth): NOT met" in tables.speed(tmp_path)
    stats = lambda hit, moved: {"decode_hit_rate": hit, "decode_bytes_per_token": moved}
    offload = {"command": "python experiments/offload.py --gpu", "device": "GPU X", "layers": 12,
               "experts_total_bytes": 34e9, "cache_size": 4, "median_tokens_per_s": {"offloaded": 6.0, "on_demand": 2.0},
               "device_bytes": {"offloaded": 18e9, "on_demand": 5e9}, "speedup_vs_on_demand": 3.0,
               "offload": {"offloaded": stats(0.8, 1e9), "on_demand": stats(0.0, 5e9)}}
    (tmp_path / "offload_gpu.json").write_text(json.dumps(offload))
    row = next(r for r in tables.speed(tmp_path).splitlines() if r.startswith("| expert offloading on an GPU X"))
    assert "decode 6.00 tokens/s vs 2.00 on demand (3.00x)" in row and "hit rate 0.80" in row
