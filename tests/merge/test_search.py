"""`jmoe merge --search`: CMA-ES over a configuration's numbers, scored by an evaluation."""

import json

import jax
import numpy as np
import pytest
import yaml

from jmoe.cli import main
from jmoe.io import load_safetensors, save_safetensors
from jmoe.merge import MergeError
from jmoe.merge.search import knobs, search, with_values

RAW = {"merge_method": "karcher", "base_model": "b",
       "models": [{"model": "a", "parameters": {"weight": [0.2, 0.8], "density": 1}},
                  {"model": "c", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.5}]}}],
       "parameters": {"normalize": True, "lambda": 1.0, "max_iter": 10}}


def test_knobs_are_the_numbers_of_the_parameters():
    ks = knobs(RAW)
    assert [k.name for k in ks] == ["parameters.lambda", "parameters.max_iter", "models[0].parameters.weight[0]",
                                    "models[0].parameters.weight[1]", "models[0].parameters.density",
                                    "models[1].parameters.weight[0].value", "models[1].parameters.weight[1].value"]
    # karcher reads max_iter as an integer; the knobs keep whatever method the configuration names
    assert [(k.low, k.high, k.integer) for k in ks][:5] == [(0, 2, False), (0, 20, True), (0, 1, False),
                                                           (0, 1.6, False), (0, 2, False)]
    assert ks[-1].high == 3.0 and ks[1].value(0.26) == 5 and ks[2].value(2.0) == 1.0
    out = with_values(RAW, ks, [0.5, 7, 0.1, 0.2, 2, 0.3, 0.4])
    assert out["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": 0.3}
    assert out["models"][0]["parameters"]["density"] == 2 and RAW["models"][0]["parameters"]["density"] == 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    trees = {}
    for name in ("a", "b"):
        trees[name] = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(np.float32)}
        save_safetensors(trees[name], root / name)
        (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    (root / "lin.yml").write_text("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, "
                                  "{model: b, parameters: {weight: 1}}]\n")
    return root, trees


def test_cma_finds_the_weights_of_a_target_merge(pair, tmp_path):
    root, trees = pair
    name = "model.layers.0.mlp.up_proj.weight"
    target = 0.2 * trees["a"][name] + 0.8 * trees["b"][name]

    def evaluate(path):
        got = load_safetensors(path, lazy=False)[name]
        return -float(np.abs(got - target).mean()), {}

    logs = []
    out = tmp_path / "out"
    res = search(root / "lin.yml", out, evaluate=evaluate, max_evals=40, sigma=0.3, seed=0, log=logs.append)
    lines = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 40 == res["evals"] and len(logs) == 42 and logs[-1].startswith("best score")
    assert lines[0]["values"] == {"models[0].parameters.weight": 1, "models[1].parameters.weight": 1}
    assert res["score"] == max(x["score"] for x in lines) and res["score"] > 0.25 * res["start_score"]  # 4x closer
    w = res["best"]["models"]
    assert abs(w[0]["parameters"]["weight"] / (w[0]["parameters"]["weight"] + w[1]["parameters"]["weight"]) - 0.2) < 0.08
    # the best configuration, written with absolute paths, merges to what the search left in OUT_DIR
    best = yaml.safe_load((out / "best_config.yml").read_text())
    assert best == res["best"]
    assert main(["merge", str(out / "best_config.yml"), str(tmp_path / "again"), "--quiet"]) == 0
    np.testing.assert_array_equal(load_safetensors(tmp_path / "again", lazy=False)[name],
                                  load_safetensors(out, lazy=False)[name])


def test_refused_candidates_score_worst_and_the_search_goes_on(pair, tmp_path, monkeypatch):
    root, _ = pair
    import jmoe.merge.search as search_mod

    # every CMA-ES candidate puts both linear weights at 0, which the method refuses when it merges
    monkeypatch.setattr(search_mod.Knob, "value", lambda self, unit: 0.0)
    scores = iter(range(100))
    res = search(root / "lin.yml", tmp_path / "out", evaluate=lambda p: (float(next(scores)), {}), max_evals=4,
                 log=lambda m: None)
    lines = [json.loads(x) for x in (tmp_path / "out" / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["score"] == 0.0 and res["score"] == 0.0 and res["evals"] == 4
    assert all(x["score"] is None and "sum to 0" in x["invalid"] for x in lines[1:]), lines
    assert (tmp_path / "out" / "model.safetensors").exists() or list((tmp_path / "out").glob("*.safetensors"))


def test_a_configuration_that_cannot_merge_writes_nothing(pair, tmp_path):
    root, trees = pair
    other = tmp_path / "other"
    save_safetensors({"model.layers.0.mlp.up_proj.weight": np.zeros((5, 4), np.float32)}, other)
    (tmp_path / "c.yml").write_text(f"merge_method: linear\nmodels: [{{model: {root}/a, parameters: {{weight: 1}}}}, "
                                    f"{{model: {other}, parameters: {{weight: 1}}}}]\n")
    with pytest.raises(MergeError, match="as given cannot be searched.*different shapes"):
        search(tmp_path / "c.yml", tmp_path / "out", evaluate=lambda p: (0.0, {}), max_evals=3, log=lambda m: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".jmoe-search-*"))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    import shutil

    from jmoe.io import hf
    from jmoe.io.hf.architectures import llama
    from jmoe.nn import init_lm
    from tests.util import write_bpe_tokenizer

    root = tmp_path_factory.mktemp("hf")
    V = write_bpe_tokenizer(root / "tok", ["def f(x): return x", "hello world"] * 4, vocab_size=280)
    cfg = llama(dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64, eos_token_id=1,
                     bos_token_id=0))
    for i, name in enumerate(("m0", "m1")):
        hf.save(root / name, cfg, init_lm(jax.random.key(i), cfg), architecture="llama")
        for f in (root / "tok").iterdir():
            shutil.copy(f, root / name / f.name)
    (root / "cfg.yml").write_text("merge_method: linear\nmodels: [{model: m0, parameters: {weight: 1}}, "
                                  "{model: m1, parameters: {weight: 0.5}}]\n")
    (root / "flat.yml").write_text("merge_method: linear\nmodels: [{model: m0}, {model: m1}]\n")
    return root


def test_search_from_the_command_line(hf_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(hf_models / "cfg.yml"), str(out), "--search", "--tasks", "python", "--search-evals", "3",
                 "--max-windows", "2", "--popsize", "2"]) == 0
    captured = capsys.readouterr()
    best = yaml.safe_load(captured.out)
    assert best["merge_method"] == "linear" and best == yaml.safe_load((out / "best_config.yml").read_text())
    lines = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(0 < x["score"] < 1 and "python" in x["results"] for x in lines)
    assert "search: 3/3" in captured.err and (out / "config.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--search"], "--search needs --tasks"),
    (["--search", "--tasks", "nonsense"], "nonsense"),
    (["--tasks", "python"], "--tasks only apply with --search"),
    (["--search", "--tasks", "python", "--sigma", "0"], "--sigma"),
])
def test_bad_search_input_is_one_line_and_writes_nothing(hf_models, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = main(["merge", str(hf_models / "cfg.yml"), str(out), *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_configuration_without_numbers_has_nothing_to_search(hf_models, tmp_path, capsys):
    assert main(["merge", str(hf_models / "flat.yml"), str(tmp_path / "out"), "--search", "--tasks", "python"]) == 2
    assert "no numeric parameters" in capsys.readouterr().err and not (tmp_path / "out").exists()
