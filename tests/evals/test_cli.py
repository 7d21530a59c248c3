"""`jmoe train --tasks` and `jmoe evaluate`, on a run and on a Hugging Face directory."""

import json

import pytest

from jmoe.cli import main
from jmoe.data import load_corpus
from jmoe.evals.mixture import mix_spec, parse_mix
from tests.infer.test_generate_cli import hf_dir, run  # noqa: F401  (the tiny Hugging Face directory)
from tests.test_bad_input import snapshot, unchanged
from tests.train.conftest import MICRO


def test_mixture_spec_and_corpus():
    assert mix_spec("addition, prose", "3,1") == "tasks:addition=3,prose=1"
    mix = parse_mix("tasks:addition=3,prose")
    assert [(t.name, w) for t, w in mix] == [("addition", 0.75), ("prose", 0.25)]
    corpus = load_corpus("tasks:addition=3,prose=1")
    text = bytes(corpus.train).decode()
    assert abs(text.count("add ") * 12 / len(text) - 0.75) < 0.2  # about three quarters addition lines
    assert corpus.sha256 == load_corpus("tasks:addition=3,prose=1").sha256  # rebuilt the same for --resume
    val = bytes(corpus.val).decode()
    assert "add " in val and all(t not in val for t in text.split("\n")[:50] if t.startswith("add "))


def test_train_on_tasks_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "2", "--quiet", "--tasks", "addition,prose",
                 "--task-mix", "3,1", *MICRO]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["data"] == "tasks:addition=3,prose=1"
    capsys.readouterr()
    code, printed, err = run(["evaluate", "--ckpt", str(out), "--tasks", "addition,prose", "--examples", "6",
                              "--max-windows", "3", "--out", str(tmp_path / "res.json")], capsys)
    assert code == 0, err
    assert "addition" in printed and "bits_per_byte" in printed
    res = json.loads((tmp_path / "res.json").read_text())
    assert [(r["task"], r["metric"], r["n"]) for r in res["results"]] == [("addition", "exact_match", 6),
                                                                           ("prose", "bits_per_byte", 3)]
    assert res["step"] == 2 and res["split"] == "test"


def test_evaluate_a_hugging_face_directory(hf_dir, capsys):  # noqa: F811
    code, printed, err = run(["evaluate", "--ckpt", str(hf_dir), "--tasks", "addition,unicode", "--examples", "4",
                              "--max-windows", "2", "--json"], capsys)
    assert code == 0, err
    rec = json.loads(printed)
    assert [r["task"] for r in rec["results"]] == ["addition", "unicode"] and rec["results"][1]["value"] > 0


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--tasks", "adition"], "unknown task 'adition'"),
    (["evaluate", "--tasks", "addition", "--out", "/nonexistent/dir/r.json"], "does not exist"),
    (["evaluate", "--tasks", "addition", "--out", "TMP"], "is a directory; name the JSON file to write"),
    (["evaluate", "--ckpt", "NOTOKENIZER"], "has no tokenizer.json"),
    (["evaluate", "--ckpt", "BADCONFIG"], "config.json is not valid JSON (Expecting"),
    (["train", "--tasks", "addition", "--data", "x.txt"], "--tasks and --data"),
    (["train", "--task-mix", "1,2"], "--task-mix needs --tasks"),
    (["train", "--tasks", "addition,prose", "--task-mix", "1"], "1 weights for 2 tasks"),
    (["train", "--tasks", "addition", "--task-mix", "-1"], "must be positive"),
])
def test_bad_input_is_one_line_and_changes_nothing(argv, message, hf_dir, tmp_path, capsys):  # noqa: F811
    if "--ckpt" in argv:
        broken = tmp_path / "hf"
        import shutil

        shutil.copytree(hf_dir, broken)
        if "NOTOKENIZER" in argv:
            (broken / "tokenizer.json").unlink()
        else:
            (broken / "config.json").write_text("{'model_type': 'llama'}")
        argv = [a if a not in ("NOTOKENIZER", "BADCONFIG") else str(broken) for a in argv]
    elif argv[0] == "evaluate":
        argv = [*(str(tmp_path) if a == "TMP" else a for a in argv), "--ckpt", str(hf_dir)]
    else:
        argv = [*argv, "--out", str(tmp_path / "run")]
    before = snapshot(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert unchanged(before, snapshot(tmp_path))
