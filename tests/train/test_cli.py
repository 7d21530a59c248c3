"""`jmoe train / eval / generate` in-process: outputs, exact resume, and clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jmoe.cli import main
from jmoe.train import read_metrics


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "micro"
    rc = main(["train", "--out", str(run), "--steps", "8", "--eval-every", "4", "--ckpt-every", "4", "--quiet", *MICRO])
    assert rc == 0
    return run


def test_train_writes_the_run_directory(trained_run):
    run = trained_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["moe"]["num_experts"] == 4 and cfg["train"]["steps"] == 8
    assert len(cfg["data"]["sha256"]) == 64 and cfg["data"]["source"].startswith("stdlib:")
    recs = read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in evals] == [4, 8]
    assert len(train[0]["load"]) == 2 and len(train[0]["load"][0]) == 4  # 2 MoE layers x 4 experts
    assert all(np.isfinite(r["loss"]) for r in train)
    assert "tokens_per_s" in train[-1] and train[-1]["tokens_per_s"] > 0
    assert (run / "training.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == evals[-1]["val_loss"] and summary["tokens_per_s"] > 0
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]


def test_eval_and_generate(trained_run, capsys):
    assert main(["eval", "--ckpt", str(trained_run), "--json", "--batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 8 and np.isfinite(out["val_loss"]) and len(out["load"]) == 2
    np.testing.assert_allclose(out["val_bpb"], out["val_loss"] / np.log(2))
    assert main(["eval", "--ckpt", str(trained_run), "--batches", "2"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(trained_run), "--prompt", "def f(", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f(") and len(text.encode()) >= len("def f(")


def test_resume_continues_exactly(tmp_path, micro_args):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--quiet", *micro_args]
    assert main(["train", "--out", str(full), *common]) == 0
    assert main(["train", "--out", str(part), "--stop-after", "4", *common]) == 0
    # a checkpoint was written at the stop even though 4 is not a multiple of ckpt_every
    assert (part / "checkpoints" / "4").is_dir()
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    assert train_losses(part) == train_losses(full)
    ev = lambda run: [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert ev(part) == ev(full)


def test_existing_run_is_not_overwritten(trained_run, tmp_path, capsys, micro_args):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    assert main(["train", "--out", str(run), "--quiet", *micro_args]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "gigantic"], "unknown preset 'gigantic'"),
        (["train", "--set", "moe.flavour=1"], "no field"),
        (["train", "--set", "nonsense"], "section.field=value"),
        (["train", "--router", "psychic"], "router"),
        (["train", "--top-k", "99"], "top_k"),
        (["train", "--dense", "--num-experts", "4"], "--dense conflicts"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["eval", "--ckpt", "/nonexistent/run"], "not a jmoe run directory"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "r")]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_empty_corpus_directory(tmp_path, capsys, micro_args):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(empty), "--quiet", *micro_args]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty" in err and len(err.splitlines()) == 1


def test_mismatched_resume_is_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["train", "--out", str(run), "--resume", "--num-experts", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "num_experts: 4 -> 8" in err and len(err.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    latest = run / "checkpoints" / "8"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
            f.write_bytes(b"garbage")
    snapshot = {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()}
    assert main(["eval", "--ckpt", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint" in err and len(err.splitlines()) == 1
    assert main(["train", "--out", str(run), "--resume", "--steps", "10", "--quiet"]) == 2
    assert {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()} == snapshot


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, micro_args):
    run = tmp_path / "nan"
    rc = main(["train", "--out", str(run), "--steps", "40", "--ckpt-every", "1", "--quiet", "--lr", "1e30",
               "--set", "train.warmup_steps=0", "--set", "train.grad_clip=1e30", *micro_args[:-2]])
    assert rc == 3
    err = capsys.readouterr().err
    assert "became" in err and "Last good checkpoint" in err
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    # every kept checkpoint restores with finite parameters
    from jmoe.train import load_run
    import jax
    if steps:
        _, _, params, _, _, _ = load_run(run, steps[-1])
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resuming_a_finished_run_changes_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert "already finished at step 8" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert json.loads((run / "summary.json").read_text())["tokens_per_s"] > 0


def test_a_run_resumed_at_its_end_keeps_its_throughput(trained_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "summary.json").unlink()  # ended after its last checkpoint, before its summary
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["tokens_per_s"] > 0


def test_a_run_being_written_is_read_at_its_newest_checkpoint(trained_run, tmp_path, capsys):
    from tests.train.conftest import lock_held

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    with lock_held(run) as holder:
        capsys.readouterr()
        assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1"]) == 0
        assert json.loads(capsys.readouterr().out)["step"] == 8
        assert main(["generate", "--ckpt", str(run), "--max-new-tokens", "2"]) == 0
        assert main(["train", "--out", str(run), "--resume", "--steps", "12", "--quiet"]) == 2
        assert f"being written by process {holder.pid}" in capsys.readouterr().err


def test_every_option_has_help():
    from jmoe.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "eval", "generate", "plan"):
        missing = [a.option_strings for a in sub.choices[name]._actions if not a.help]
        assert not missing, (name, missing)
