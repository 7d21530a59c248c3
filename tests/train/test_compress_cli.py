"""`jmoe compress` → `jmoe eval` → `jmoe train --resume-from [--distill-from]` on a micro run."""

import json

import numpy as np
import pytest

from jmoe.cli import main
from jmoe.train import read_metrics


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "6", "--eval-every", "6", "--ckpt-every", "6", "--quiet", *MICRO]) == 0
    return run


def test_compress_writes_a_run_that_eval_and_fine_tuning_accept(source_run, tmp_path, capsys):
    out = tmp_path / "mc"
    assert main(["compress", "--ckpt", str(source_run), "--out", str(out), "--method", "mcsmoe",
                 "--target-experts", "2", "--rank", "4", "--budget", "0.3", "--calib-batches", "2", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "mcsmoe" and report["memory_ratio"] < 1
    assert report["expert_params_after"] <= 0.3 * report["expert_params_before"] / 2 + 1
    assert report["params_after"] < report["params_before"] and report["bytes_after"] < report["bytes_before"]
    assert sorted(report["groups"]) == ["0", "1"] and np.isfinite(report["val_loss_after"])
    assert (out / "routing_stats.npz").exists() and (out / "factors.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compressed_from"]["method"] == "mcsmoe" and cfg["model"]["layer_moe"]
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--json", "--batches", "2"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["step"] == 6 and np.isfinite(ev["val_loss"])

    tuned = tmp_path / "tuned"
    assert main(["train", "--resume-from", str(out), "--out", str(tuned), "--steps", "3", "--eval-every", "3",
                 "--distill-from", str(source_run), "--distill-weight", "0.5", "--quiet"]) == 0
    saved = json.loads((tuned / "config.json").read_text())
    assert saved["train"]["init_from"] == str(out.absolute()) and saved["model"] == cfg["model"]
    losses = [r["loss"] for r in read_metrics(tuned / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # the fine-tune starts where the compressed model is (a fresh model would start at ~ln 256 = 5.55)
    assert abs(losses[0] - report["val_loss_after"]) < 0.2 < np.log(256) - report["val_loss_after"]
    # the stats can be reused, and the other methods write runs too
    for method, extra in [("prune", []), ("random", ["--router", "merge"]), ("msmoe", ["--align", "activation"])]:
        dest = tmp_path / method
        assert main(["compress", "--ckpt", str(source_run), "--out", str(dest), "--method", method,
                     "--target-experts", "2", "--stats", str(out / "routing_stats.npz"), "--quiet", *extra]) == 0
        assert json.loads((dest / "report.json").read_text())["experts_per_layer"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "mcsmoe", "--target-experts", "2"], "needs rank"),
    (["--method", "prune", "--target-experts", "2", "--rank", "2"], "belong to method='mcsmoe'"),
    (["--method", "msmoe", "--target-experts", "9"], "target_experts=9"),
    (["--method", "mcsmoe", "--target-experts", "2", "--rank", "99", "--sparsity", "0.5"], "rank=99"),
])
def test_compress_errors_are_one_line_with_exit_2(source_run, tmp_path, capsys, argv, message):
    assert main(["compress", "--ckpt", str(source_run), "--out", str(tmp_path / "x"), "--calib-batches", "1",
                 "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compress_interrupted_while_writing_leaves_nothing(source_run, tmp_path, monkeypatch, capsys):
    from jmoe.train import rundir

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "write_report", interrupt)  # the last file written
    (tmp_path / "keep.txt").write_text("k")
    assert main(["compress", "--ckpt", str(source_run), "--out", str(tmp_path / "new" / "out"), "--method", "prune",
                 "--target-experts", "2", "--calib-batches", "1", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt"]


def test_fine_tuning_from_a_missing_run_is_refused(tmp_path, capsys):
    assert main(["train", "--resume-from", str(tmp_path / "nope"), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "not a jmoe run directory" in capsys.readouterr().err
