"""The run directory: config.json round trip and byte layout, clear errors for missing or
corrupt files, checkpoints, summary and report, resume compatibility, one writer at a time."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.nn import LMConfig
from jmoe.train import TrainConfig, TrainError, rundir
from jmoe.train.state import init_train_state, make_optimizer
from tests.train.conftest import MICRO, ROOT, lock_held
from tests.util import tree_allclose

MODEL = LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                 moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8))
TRAIN = TrainConfig(steps=3, batch_size=4, seq_len=16)
DATA = {"source": "stdlib:test", "sha256": "ab" * 32}


def test_config_round_trip_and_layout(tmp_path):
    path = rundir.write_config(tmp_path, MODEL, TRAIN, DATA)
    assert path == tmp_path / "config.json"
    model, tc, data = rundir.read_config(tmp_path)
    assert model == MODEL and tc == TRAIN and data == DATA
    # the layout earlier runs were written with: these keys, this order, indent=1
    expected = {"model": MODEL.to_dict(), "train": TRAIN.to_dict(), "data": DATA, "jmoe_version": jmoe.__version__}
    assert path.read_text() == json.dumps(expected, indent=1)


def test_extra_entries_follow_the_standard_ones(tmp_path):
    rundir.write_config(tmp_path, MODEL, TRAIN, DATA, compressed_from={"source": "/r", "step": 2, "method": "prune"})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert list(saved) == ["model", "train", "data", "jmoe_version", "compressed_from"]
    assert rundir.read_run_config(tmp_path)["compressed_from"]["step"] == 2


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="not a jmoe run directory") as e:
        rundir.read_config(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "config.json") in str(e.value)


@pytest.mark.parametrize("text", [
    "{not json",
    json.dumps({"train": TRAIN.to_dict()}),  # no model
    json.dumps({"model": MODEL.to_dict(), "train": {**TRAIN.to_dict(), "no_such_field": 1}}),
    json.dumps({"model": MODEL.to_dict(), "train": {**TRAIN.to_dict(), "steps": 0}}),  # invalid value
    json.dumps([1, 2]),
])
def test_corrupt_config_names_the_file(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="is corrupt") as e:
        rundir.read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert isinstance(e.value, TrainError)


def test_run_dir_predicates(tmp_path):
    assert not rundir.in_use(tmp_path) and not rundir.is_run_dir(tmp_path)
    rundir.write_config(tmp_path, MODEL, TRAIN, DATA)
    assert rundir.in_use(tmp_path) and not rundir.is_run_dir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert rundir.is_run_dir(tmp_path)


def test_checkpoint_then_load_run(tmp_path):
    tx, _ = make_optimizer(TRAIN)
    state = init_train_state(MODEL, TRAIN, tx)
    rundir.write_config(tmp_path, MODEL, TRAIN, DATA)
    store = rundir.checkpoint_store(tmp_path, keep=1)
    try:
        store.save(2, state, {"step": 2, "data_position": 2})
    finally:
        store.close()
    assert (tmp_path / "checkpoints" / "2").is_dir()
    model, tc, params, router_state, saved, step = rundir.load_run(tmp_path)
    assert model == MODEL and tc == TRAIN and step == 2 and saved["data"] == DATA and router_state is None
    tree_allclose(params, state["params"], rtol=0, atol=0)
    with pytest.raises(TrainError, match="no checkpoint at step 5"):
        rundir.load_run(tmp_path, 5)


def test_a_step_removed_while_listing_is_listed_again(tmp_path, monkeypatch):
    """A reader lists the checkpoints while the writer deletes its oldest: the step that vanished
    between listing and reading its metadata is dropped, not an error."""
    import shutil

    from jmoe.train import checkpoint

    tx, _ = make_optimizer(TRAIN)
    state = init_train_state(MODEL, TRAIN, tx)
    store = rundir.checkpoint_store(tmp_path, keep=3)
    try:
        for step in (1, 2):
            store.save(step, state, {"step": step, "data_position": step})
    finally:
        store.close()
    real, calls = checkpoint.ocp.CheckpointManager, []

    def racing(directory, **kw):  # the writer removes step 1 while this reader lists it
        calls.append(directory)
        if len(calls) == 1:
            shutil.rmtree(tmp_path / "checkpoints" / "1")
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "checkpoints" / "1"))
        return real(directory, **kw)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", racing)
    assert rundir.checkpoint_steps(tmp_path) == [2] and len(calls) == 2


def test_load_run_without_checkpoints(tmp_path):
    rundir.write_config(tmp_path, MODEL, TRAIN, DATA)
    with pytest.raises(TrainError, match="has no checkpoints"):
        rundir.load_run(tmp_path)


def test_summary_and_report(tmp_path):
    assert rundir.read_summary(tmp_path) is None
    rundir.write_summary(tmp_path, {"steps": 3, "val_loss": 1.5})
    assert rundir.read_summary(tmp_path) == {"steps": 3, "val_loss": 1.5}
    rundir.write_report(tmp_path, {"method": "prune"})
    assert json.loads((tmp_path / "report.json").read_text()) == {"method": "prune"}
    log = rundir.metrics_log(tmp_path)
    log.append({"kind": "train", "step": 1, "loss": 2.0})
    assert log.path == tmp_path / "metrics.jsonl" and log.records()[0]["loss"] == 2.0


def test_resume_compatibility():
    saved = rundir.run_config(MODEL, TRAIN, DATA)
    rundir.check_resumable(saved, MODEL, TRAIN.replace(steps=10, eval_every=5), DATA["sha256"])
    with pytest.raises(TrainError, match="training settings differ .*lr"):
        rundir.check_resumable(saved, MODEL, TRAIN.replace(lr=1e-4), DATA["sha256"])
    with pytest.raises(TrainError, match="the model differs .*d_ff"):
        rundir.check_resumable(saved, MODEL.replace(d_ff=64), TRAIN, DATA["sha256"])
    with pytest.raises(TrainError, match="the corpus differs"):
        rundir.check_resumable(saved, MODEL, TRAIN, "cd" * 32)


def test_written_runs_restore_on_one_device(tmp_path):
    tx, _ = make_optimizer(TRAIN)
    state = init_train_state(MODEL, TRAIN, tx)
    rundir.write_config(tmp_path, MODEL, TRAIN, DATA)
    store = rundir.checkpoint_store(tmp_path)
    try:
        store.save(1, state, {"step": 1})
        store.save(3, state, {"step": 3})
    finally:
        store.close()
    *_, step = rundir.load_run(tmp_path, 1)
    assert step == 1
    _, _, params, *_ = rundir.load_run(tmp_path)
    assert all(isinstance(x, jax.Array) and x.sharding.device_set == {jax.local_devices()[0]}
               for x in jax.tree.leaves(params))
    assert np.isfinite(np.asarray(params["embed"]["w"])).all()


# ------------------------------------------------------------------ one writer at a time

TRY_LOCK = """
import sys
from jmoe.train import rundir
try:
    rundir.lock(sys.argv[1]).release()
    print("locked")
except rundir.RunLocked as e:
    print(e)
"""


def try_lock_elsewhere(run) -> str:
    """What another process gets when it tries to lock `run`."""
    p = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_one_writer_at_a_time(tmp_path):
    run = tmp_path / "runs" / "a"
    with rundir.lock(run) as lock:
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        assert lock.created == [run, run.parent]
        said = try_lock_elsewhere(run)
        assert said.startswith(f"{run} is being written by process {os.getpid()}"), said
        assert rundir.checkpoint_steps(run) == []  # readers do not take the lock
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "runs"]  # the lock file goes with the lock
    assert try_lock_elsewhere(run) == "locked"


def test_a_failed_start_leaves_no_directory(tmp_path):
    lock = rundir.lock(tmp_path / "new" / "run")
    lock.release(remove_created=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TrainError, match="is not a directory"):
        rundir.lock(a_file(tmp_path))


def test_a_failed_start_in_a_directory_that_was_there_leaves_it_as_it_was(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("x")
    os.utime(run, ns=(1_000_000_000, 2_000_000_000))
    rundir.lock(run).release(remove_created=True)
    assert os.stat(run).st_mtime_ns == 2_000_000_000 and [p.name for p in run.iterdir()] == ["notes.txt"]
    rundir.lock(run).release()  # a run that wrote: the directory's times are its own
    assert os.stat(run).st_mtime_ns != 2_000_000_000


def a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


def test_the_lock_of_a_killed_writer_is_free(tmp_path):
    run = tmp_path / "run"
    with lock_held(run) as holder:
        with pytest.raises(rundir.RunLocked, match=f"process {holder.pid}"):
            rundir.lock(run)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # left behind by kill -9, and not stale:
    with rundir.lock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_a_run_being_trained_reads_safely_and_has_one_writer(tmp_path, capsys):
    """A second writer is refused while `jmoe train` runs, and eval reads the newest complete
    checkpoint while the trainer saves a checkpoint every step and keeps only the newest two."""
    from jmoe.cli import main

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "jmoe.cli", "train", "--out", str(run), "--steps", "100000",
                          "--ckpt-every", "1", "--keep-ckpts", "2", "--eval-every", "100000", "--quiet", *MICRO],
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while len(rundir.checkpoint_steps(run)) < 2:
            assert p.poll() is None, p.stderr.read()
            assert time.time() - t0 < 300, "no checkpoints"
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {p.pid}" in err and len(err.strip().splitlines()) == 1, err
        steps = []
        for _ in range(2):  # in a process of its own: this one's PRNG keys differ (tests/conftest.py)
            ev = subprocess.run([sys.executable, "-m", "jmoe.cli", "eval", "--ckpt", str(run), "--json",
                                 "--batches", "1"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                                capture_output=True, text=True, timeout=300)
            assert ev.returncode == 0 and not ev.stderr, ev.stderr
            steps.append(json.loads(ev.stdout)["step"])
        assert steps == sorted(steps) and steps[0] >= 2
        assert p.poll() is None  # the writer went on meanwhile
    finally:
        p.kill()
        p.wait()
    with rundir.lock(run):
        pass
