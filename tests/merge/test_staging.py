"""Outputs built in a temporary sibling and moved into place at the end: a failure, Ctrl-C
included, leaves nothing on disk; `jmoe merge` interrupted half way leaves no OUT_DIR."""

import json

import numpy as np
import pytest

from jmoe.cli import main
from jmoe.io import load_safetensors, save_safetensors
from jmoe.merge import checkpoints
from jmoe.merge.staging import check_output_dir, staged_dir, staging_path


def tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_success_renames_the_sibling_into_place(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_dir(out) as tmp:
        assert tmp == staging_path(out) and tmp.parent == out.parent and tmp.name.startswith("out.tmp-")
        (tmp / "x.txt").write_text("x")
    assert tree(tmp_path / "a") == [("b", None), ("b/out", None), ("b/out/x.txt", b"x")]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing(tmp_path, error):
    (tmp_path / "keep.txt").write_text("k")
    before = tree(tmp_path)
    with pytest.raises(type(error)):
        with staged_dir(tmp_path / "new" / "deeper" / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"...")
            raise error
    assert tree(tmp_path) == before


def test_an_empty_out_is_replaced_and_a_non_empty_one_is_written_into(tmp_path):
    (tmp_path / "empty").mkdir()
    with staged_dir(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("new")
    assert tree(tmp_path / "empty") == [("a", b"new")]
    with staged_dir(tmp_path / "empty") as tmp:
        (tmp / "b").write_text("b")
        (tmp / "a").write_text("newer")
    assert tree(tmp_path / "empty") == [("a", b"newer"), ("b", b"b")]
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "absent") == tmp_path / "absent"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(ValueError, match="full is not empty; choose another OUT_DIR or pass --force$"):
        check_output_dir(tmp_path / "full", flag="OUT_DIR", force_flag="--force")
    assert check_output_dir(tmp_path / "full", force=True)
    with pytest.raises(ValueError, match="is not a directory"):
        check_output_dir(tmp_path / "full" / "f", force=True)


def _model(path, seed, layers=3):
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i}.mlp.weight" for i in range(layers)] + ["lm_head.weight"]
    save_safetensors({n: rng.standard_normal((4, 3)).astype(np.float32) for n in names}, path)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


def test_merge_interrupted_half_way_leaves_nothing(tmp_path, monkeypatch, capsys):
    _model(tmp_path / "a", 0)
    _model(tmp_path / "b", 1)
    (tmp_path / "m.yml").write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    before = tree(tmp_path)
    calls = []
    real = checkpoints.merge_tensor

    def interrupt_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "merge_tensor", interrupt_on_the_third)
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "new" / "out"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 3 and tree(tmp_path) == before


def test_force_replaces_the_checkpoint_in_a_non_empty_out(tmp_path):
    _model(tmp_path / "a", 0)
    _model(tmp_path / "b", 1)
    out = tmp_path / "out"
    save_safetensors({"old": np.zeros((300,), np.float32), "old2": np.zeros((300,), np.float32)}, out,
                     max_shard_size=1500)  # two shards and an index, to be replaced
    (out / "README.md").write_text("mine")
    (tmp_path / "m.yml").write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    assert main(["merge", str(tmp_path / "m.yml"), str(out), "--quiet"]) == 2
    assert main(["merge", str(tmp_path / "m.yml"), str(out), "--quiet", "--force"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors"]
    assert "old" not in load_safetensors(out, lazy=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m.yml", "out"]


def test_a_file_above_out_is_found_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile is not a directory, so .*sub cannot be made; choose another --out$"):
        check_output_dir(tmp_path / "afile" / "deeper" / "sub")


def test_one_writer_at_a_time(tmp_path):
    """A command writing a run holds its lock: a second writer is refused by the check before
    any work and by the staging itself, and the first one's output is untouched."""
    from jmoe.train.rundir import LOCK, RunLocked, lock

    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "mine.txt").write_text("first")
        with pytest.raises(ValueError, match=rf"out is being written by process \d+; wait for it"):
            check_output_dir(out, force=True)
        with pytest.raises(RunLocked):
            with staged_dir(out):
                pass
    assert tree(out) == [("mine.txt", b"first")]
    with lock(out):  # e.g. `jmoe train --out out` running
        with pytest.raises(RunLocked, match="is being written by process"):
            with staged_dir(out):
                pass
    assert tree(out) == [("mine.txt", b"first")]
    # a lock file left by a killed writer neither blocks nor counts as content
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK).write_text("12345\n")
    assert check_output_dir(tmp_path / "stale") == tmp_path / "stale"
    with staged_dir(tmp_path / "stale") as tmp:
        (tmp / "a").write_text("a")
    assert tree(tmp_path / "stale") == [("a", b"a")]


def test_merge_into_a_run_another_process_writes_is_refused_before_any_work(tmp_path, capsys):
    from jmoe.train.rundir import lock

    _model(tmp_path / "a", 0)
    _model(tmp_path / "b", 1)
    (tmp_path / "m.yml").write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    out = tmp_path / "out"
    with lock(out):  # e.g. `jmoe train --out out` running
        before = tree(tmp_path)
        assert main(["merge", str(tmp_path / "m.yml"), str(out), "--quiet", "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is being written by process" in err and len(err.splitlines()) == 1
        assert tree(tmp_path) == before
