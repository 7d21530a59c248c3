"""`jmoe cache-sim` and `jmoe trace-report` from the command line: output, files, exit codes."""

import json

import numpy as np

from jmoe.cli import main
from jmoe.infer.trace import RoutingTrace


def _trace(path, N=120, L=2, k=2, E=6):
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(N)]).astype(np.int32)
    RoutingTrace(expert_ids=ids, weights=np.full((N, L, k), 0.5, np.float32), num_experts=E,
                 seq_ids=np.repeat(np.arange(2), N // 2).astype(np.int32)).save(path)
    return path


def test_cache_sim_and_trace_report(tmp_path, capsys):
    trace = str(_trace(tmp_path / "t.npz"))
    rates = {}
    for policy in ("lru", "belady"):
        assert main(["cache-sim", trace, "--cache-size", "3", "--policy", policy, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["policy"] == policy and out["requests"] == 120 * 2 * 2 and len(out["per_layer"]) == 2
        rates[policy] = out["hit_rate"]
    assert rates["belady"] >= rates["lru"] > 0
    assert main(["trace-report", trace, "--out", str(tmp_path / "rep"), "--segment-lengths", "4", "16"]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["trace"]["num_tokens"] == 120 and (tmp_path / "rep" / "report.png").stat().st_size > 1000


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    trace = str(_trace(tmp_path / "t.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for argv, message in [
        (["cache-sim", trace, "--cache-size", "1"], "smaller than top-k 2"),
        (["cache-sim", trace, "--cache-size", "3", "--policy", "fifo"], "invalid choice"),
        (["cache-sim", str(tmp_path / "bad.npz"), "--cache-size", "3"], "bad.npz"),
        (["trace-report", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")], "missing.npz"),
    ]:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
