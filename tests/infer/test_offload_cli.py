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
        (["cache-sim", trace, "--cache-size", "7"], "--cache-size 7 exceeds the trace's 6 experts"),
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


# ---------------------------------------------------------------- jmoe trace, generate --offload-experts
from tests.infer.test_generate_cli import hf_dir, run  # noqa: E402,F401  (the tiny Mixtral directory)


def test_trace_and_offloaded_generate(hf_dir, tmp_path, capsys):  # noqa: F811
    from jmoe.infer.predict import trace_gate_accuracy

    (tmp_path / "data.txt").write_text("def f(x): return x\nthe mixture of experts\n" * 3)
    code, out, err = run(["trace", "--ckpt", str(hf_dir), "--data", str(tmp_path / "data.txt"), "--out",
                          str(tmp_path / "t.npz"), "--seq-len", "16", "--quiet"], capsys)
    assert code == 0, err
    trace = RoutingTrace.load(tmp_path / "t.npz")
    assert trace.num_layers == 2 and trace.num_experts == 4 and trace.top_k == 2 and "wrote" in out
    assert trace.num_sequences == -(-trace.num_tokens // 16) and trace_gate_accuracy(trace)[0] is None
    again = ["trace", "--ckpt", str(hf_dir), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "t.npz"),
             "--seq-len", "8", "--quiet"]
    before = (tmp_path / "t.npz").read_bytes()
    code, out, err = run(again, capsys)
    assert code == 2 and "t.npz exists (--force replaces it)" in err and (tmp_path / "t.npz").read_bytes() == before
    code, out, err = run(again + ["--force"], capsys)
    assert code == 0, err
    assert RoutingTrace.load(tmp_path / "t.npz").num_sequences == -(-trace.num_tokens // 8)

    (tmp_path / "p.txt").write_text("def f(\nhello\nthe mixture of experts is\n")
    base = ["generate", "--ckpt", str(hf_dir), "--prompts-file", str(tmp_path / "p.txt"), "--json",
            "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos"]
    code, out, err = run(base, capsys)
    assert code == 0, err
    resident = [json.loads(x) for x in out.splitlines()][:3]
    for extra in (["--expert-cache", "2", "--cache-policy", "arc"],
                  ["--expert-memory", "1MiB", "--prefetch", "learned", "--predictor-trace", str(tmp_path / "t.npz")],
                  ["--cache-policy", "none", "--expert-store", "disk", "--expert-store-path",
                   str(tmp_path / "experts.safetensors")]):
        code, out, err = run(base + ["--offload-experts", "--trace", str(tmp_path / "g.npz"), *extra], capsys)
        assert code == 0, err
        lines = [json.loads(x) for x in out.splitlines()]
        assert [x["token_ids"] for x in lines[:3]] == [x["token_ids"] for x in resident], extra
        off = lines[3]["offload"]
        assert off["requests"] > 0 and off["bytes_loaded"] > 0 and off["device_bytes"] > 0
        g = RoutingTrace.load(tmp_path / "g.npz")
        assert g.num_sequences == 3


def test_offload_and_trace_bad_input(hf_dir, tmp_path, capsys):  # noqa: F811
    (tmp_path / "data.txt").write_text("hello")
    gen = ["generate", "--ckpt", str(hf_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    for argv, message in [
        (gen + ["--expert-cache", "2"], "--expert-cache needs --offload-experts"),
        (gen + ["--offload-experts", "--expert-cache", "1"], "smaller than top-k 2"),
        (gen + ["--offload-experts", "--expert-cache", "9"], "exceeds the 4 experts"),
        (gen + ["--offload-experts", "--expert-memory", "10KB"], "at least top-k = 2"),
        (gen + ["--offload-experts", "--expert-memory", "lots"], "is not a size"),
        (gen + ["--offload-experts", "--prefetch", "learned"], "needs --predictor-trace"),
        (gen + ["--offload-experts", "--cache-policy", "belady"], "invalid choice"),
        (gen + ["--offload-experts", "--expert-store", "disk"], "needs --expert-store-path"),
        (gen + ["--trace", str(tmp_path / "no" / "t.npz")], "does not exist"),
        (["trace", "--ckpt", str(hf_dir), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.npz")],
         "missing.txt does not exist"),
        (["trace", "--ckpt", str(hf_dir), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "t.npz"),
          "--seq-len", "4096"], "exceeds the model's context"),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "t.npz").exists()
