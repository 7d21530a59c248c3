"""`jmoe unlearn`: a run made to forget one evaluation task, as a new run."""

import json

import numpy as np
import pytest

from jmoe.cli import main
from tests.test_bad_input import snapshot, unchanged


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "4", "--eval-every", "4", "--ckpt-every", "4", "--quiet",
                 "--tasks", "addition,reversal", *MICRO]) == 0
    return run


def test_unlearn_writes_a_run_that_forgot_the_task(task_run, tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["unlearn", "--ckpt", str(task_run), "--out", str(out), "--forget", "addition", "--retain", "reversal",
                 "--steps", "6", "--lr", "0.05", "--batches", "2", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["forget"] == "addition" and report["scope"] == "expert" and report["method"] == "ga"
    assert report["val_loss_after"]["forget"] > report["val_loss_before"]["forget"]
    assert report["trainable_params"] < 0.2 * report["total_params"]
    aff = np.asarray(report["affinity"])
    assert aff[:, report["expert"]].max() == aff.max()
    assert json.loads((out / "config.json").read_text())["unlearned_from"]["forget"] == "addition"
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--json", "--batches", "2"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])


@pytest.mark.parametrize("args, message", [
    (["--forget", "nonsense"], "nonsense"),
    (["--forget", "addition", "--method", "gdiff"], "needs --retain"),
    (["--forget", "addition", "--retain", "addition"], "names the forget task"),
    (["--forget", "addition,reversal"], "names one task"),
    (["--forget", "addition", "--lr", "0"], "--lr"),
    (["--forget", "addition", "--steps", "0"], "--steps"),
])
def test_bad_input_is_one_line_and_changes_nothing(task_run, tmp_path, capsys, args, message):
    before = snapshot(tmp_path, task_run)
    try:
        code = main(["unlearn", "--ckpt", str(task_run), "--out", str(tmp_path / "u"), *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert unchanged(before, snapshot(tmp_path, task_run))
