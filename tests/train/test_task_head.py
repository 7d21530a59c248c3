"""Multi-task heads (`jmoe.nn.task_head`, `jmoe.train.task_head`, `jmoe task-head`): a new head
leaves the model unchanged; task outputs fit tasks that one shared mixture cannot; only the
head trains; the written run evaluates each task with its own output and decodes as a task
with the KV cache exactly as full forwards do; bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig, evals
from jmoe.cli import main
from jmoe.infer import Engine
from jmoe.nn import LMConfig, init_lm, lm_apply
from jmoe.nn.task_head import TaskHeadConfig, head_config, init_task_head
from jmoe.train import rundir
from jmoe.train.task_head import evaluate_task_head, train_task_head
from tests.infer.test_generate_cli import run
from tests.train.conftest import refused_in_one_line
from tests.util import greedy_by_full_forwards

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)
TWO = evals.resolve_tasks("addition,prose")  # one algorithmic task, one text domain: two HoME categories


def _with_head(kind: str, **kw) -> LMConfig:
    return CFG.replace(task_head=head_config(TWO, kind, 16, hidden=16, experts=4, **kw))


def _two_rules(i: int) -> tuple[np.ndarray, np.ndarray]:
    """[32, 2] pairs of a random token and the next one, rows 0-15 of task 0 (t -> 7t + 3 mod
    40), rows 16-31 of task 1 (t -> 11t + 5 mod 40), and their task ids: the same inputs with
    a rule per task, which nothing in a row's context tells apart."""
    rng = np.random.default_rng(i)
    ids = np.repeat(np.arange(2, dtype=np.int32), 16)
    x = rng.integers(0, 40, 32)
    return np.stack([x, np.where(ids == 0, 7 * x + 3, 11 * x + 5) % 40], axis=1).astype(np.int32), ids


def test_a_new_head_changes_nothing_and_round_trips():
    cfg = _with_head("home")
    params = init_lm(jax.random.key(0), cfg)
    tokens = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8))
    base, _ = lm_apply(params, tokens, cfg)
    for task in ("addition", "prose"):
        logits, _ = lm_apply(params, tokens, cfg.replace(task_head=cfg.task_head.replace(task=task)))
        np.testing.assert_array_equal(logits, base)
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "task_head" not in CFG.to_dict()


@pytest.fixture(scope="module")
def trained():
    """Each kind's head after 100 steps on the two rules over an untrained model (its final
    norm scaled up, as training does, so that the logits can grow)."""
    params = init_lm(jax.random.key(0), CFG)
    params["final_norm"] = jax.tree.map(lambda a: 6.0 * a, params["final_norm"])
    out = {}
    for kind in ("home", "mmoe", "shared"):
        cfg = _with_head(kind)
        head = init_task_head(jax.random.key(1), cfg.task_head)
        head, hist = train_task_head(cfg, params, None, head, _two_rules, steps=100, lr=1e-2, log_every=50)
        val = [np.stack([_two_rules(10_000 + j)[0][16 * t: 16 * t + 16] for j in range(2)]) for t in range(2)]
        out[kind] = (head, hist, evaluate_task_head(cfg, params, None, head, val))
    return params, out


def test_task_outputs_fit_rules_that_one_shared_mixture_cannot(trained):
    _, out = trained
    scores = {kind: s for kind, (_, _, s) in out.items()}
    assert scores["shared"]["head_loss"] > 0.6  # at best half of each rule: log 2 = 0.69
    for kind in ("home", "mmoe"):
        assert scores[kind]["head_loss"] < 0.5 * scores["shared"]["head_loss"], (kind, scores)
    hist = out["home"][1]
    assert [h["step"] for h in hist] == [50, 100] and hist[-1]["loss"] < hist[0]["loss"]
    assert scores["home"]["zero_share"] == 0.0 < scores["mmoe"]["zero_share"]  # ReLU units at exactly 0
    gates = scores["home"]["gates"]
    assert set(gates) == {"addition", "prose"} and np.isclose(sum(gates["prose"]), 1.0)


def test_a_trained_head_runs_as_each_task_in_the_model(trained):
    params, out = trained
    cfg = _with_head("home")
    p = {**params, "task_head": out["home"][0]}
    seqs, ids = _two_rules(20_000)
    for t, task in enumerate(("addition", "prose")):
        as_task = cfg.replace(task_head=cfg.task_head.replace(task=task))
        logits, _ = lm_apply(p, jnp.asarray(seqs[:, :-1]), as_task)
        right = np.asarray(jnp.argmax(logits, -1) == seqs[:, 1:])
        assert right[ids == t].mean() > 0.8 and right[ids != t].mean() < 0.2  # the rules never agree
    prompt = seqs[16, :1].tolist()  # KV-cached decoding as "prose" equals full forwards
    gens, _ = Engine(as_task, p, None, batch_size=1).generate([prompt], max_new_tokens=6)
    assert list(gens[0].token_ids) == greedy_by_full_forwards(p, as_task, prompt, 6)


def test_bad_configs_are_named():
    home = head_config(TWO, "home", 16)
    with pytest.raises(ValueError, match="task 'sorting' has no output"):
        home.replace(task="sorting")
    with pytest.raises(ValueError, match="names a task twice"):
        TaskHeadConfig(tasks=("a", "a"), home=home.home)
    with pytest.raises(ValueError, match="3 towers for 2 tasks"):
        TaskHeadConfig(tasks=("a", "b"), home=head_config(evals.resolve_tasks("addition,prose,python"), "home", 16).home)
    with pytest.raises(ValueError, match="d_model=16"):
        CFG.replace(task_head=head_config(TWO, "home", 32))
    with pytest.raises(ValueError, match="--head 'moe' is unknown"):
        head_config(TWO, "moe", 16)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def head_dir(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("head") / "h"
    assert main(["task-head", "--ckpt", str(micro_run), "--out", str(out), "--tasks", "addition,prose", "--steps", "30",
                 "--lr", "0.01", "--hidden", "16", "--eval-batches", "1", "--quiet"]) == 0
    return out


def test_cli_writes_a_run_that_evaluates_and_decodes_per_task(micro_run, head_dir, capsys):
    config = json.loads((head_dir / "config.json").read_text())
    assert config["model"]["task_head"]["tasks"] == ["addition", "prose"]
    assert config["model"]["task_head"]["kind"] == "home" and config["model"]["task_head"]["task"] is None
    report = json.loads((head_dir / "report.json").read_text())
    prose = report["scores"]["tasks"]["prose"]
    assert prose["head_loss"] < prose["model_loss"] and report["rows"] == 2
    # the model's own weights are the source run's, bit for bit
    _, _, src, _, _, _ = rundir.load_run(micro_run)
    _, _, headed, _, _, _ = rundir.load_run(head_dir)
    assert set(headed) == set(src) | {"task_head"}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(src), jax.tree.leaves({k: headed[k] for k in src})))
    scores = {}
    for ckpt in (micro_run, head_dir):
        code, out, _ = run(["evaluate", "--ckpt", str(ckpt), "--tasks", "prose", "--max-windows", "2", "--json"], capsys)
        assert code == 0
        scores[ckpt] = json.loads(out)["results"][0]["value"]
    assert scores[head_dir] < scores[micro_run]  # prose scored with its own output
    code, out, err = run(["generate", "--ckpt", str(head_dir), "--prompt", "ab", "--max-new-tokens", "3"], capsys)
    assert code == 0 and "without --task it runs as the model it was trained on" in err
    code, out, _ = run(["generate", "--ckpt", str(head_dir), "--task", "prose", "--prompt", "ab", "--max-new-tokens", "3",
                        "--json", "--temperature", "0", "--ignore-eos"], capsys)
    assert code == 0 and len(json.loads(out.splitlines()[0])["token_ids"]) == 3


@pytest.mark.parametrize("args, message", [
    (["task-head", "--out", "{tmp}/h", "--tasks", "nope"], "nope"),
    (["task-head", "--out", "{tmp}/h", "--steps", "0"], "--steps"),
    (["task-head", "--out", "{tmp}/h", "--head", "moe"], "--head"),
    (["task-head", "--out", "{src}"], "not empty"),
    (["generate", "--task", "prose"], "has no task head"),
])
def test_bad_input_is_one_line_and_changes_nothing(micro_run, tmp_path, capsys, args, message):
    refused_in_one_line(args, message, micro_run, tmp_path, capsys)


def test_head_runs_refuse_a_second_head_and_unknown_tasks(head_dir, tmp_path, capsys):
    code, _, err = run(["task-head", "--ckpt", str(head_dir), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "has a task head already" in err and not (tmp_path / "x").exists()
    code, _, err = run(["generate", "--ckpt", str(head_dir), "--task", "sorting"], capsys)
    assert code == 2 and "--task: task 'sorting' has no output in this model's head" in err.strip()
    code, _, err = run(["train", "--resume-from", str(head_dir), "--out", str(tmp_path / "t"), "--steps", "2"], capsys)
    assert code == 2 and "jmoe train does not train" in err and not (tmp_path / "t").exists()
