"""The progress line of training: its ETA leaves out the steps that compile."""

import io

from jmoe.progress import Progress


def test_eta_leaves_out_the_compiling_step(monkeypatch):
    clock = iter([0.0, 100.0, 101.0, 102.0])  # a first (compiling) step of 100 s, then 1 s per step
    monkeypatch.setattr("jmoe.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = Progress(10, start=0, stream=out, every=1, warmup=1)
    bar.update(1, {"loss": "5.0"})
    bar.update(2, {"loss": "4.0"})
    bar.update(3, {"loss": "3.0"})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("eta ?")
    assert lines[1].endswith("eta 0:08") and lines[2].endswith("eta 0:07")  # not 100 s per step


def test_eta_of_a_resumed_run_counts_from_its_start(monkeypatch):
    clock = iter([0.0, 50.0, 52.0])
    monkeypatch.setattr("jmoe.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = Progress(100, start=40, stream=out, every=1, warmup=1)
    bar.update(41, {})
    bar.update(42, {})
    assert out.getvalue().splitlines()[1].endswith("eta 1:56")  # 58 steps of 2 s
