"""`jmoe merge CONFIG.yml OUT_DIR`: mergekit configurations over multi-shard checkpoints,
tensor by tensor, equal to the in-memory merge."""

import json
import textwrap
import jax
import ml_dtypes
import numpy as np
import pytest

from jmoe import merge
from jmoe.cli import main
from jmoe.io import load_safetensors, save_safetensors

LAYERS = 4


def make_model(dir_, seed, base=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    names = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,), "lm_head.weight": (10, 8)}
    for i in range(LAYERS):
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (8, 8)
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (16, 8)
        names[f"model.layers.{i}.input_layernorm.weight"] = (8,)
    tree = {}
    for n, shape in names.items():
        x = rng.standard_normal(shape).astype(np.float32)
        tree[n] = (base[n].astype(np.float32) + 0.1 * x if base is not None else x).astype(dtype)
    save_safetensors(tree, dir_, max_shard_size=1200)
    (dir_ / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS,
                                                  "torch_dtype": "float32"}))
    (dir_ / "tokenizer.json").write_text("{}")
    return tree


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = make_model(root / "base", 0)
    ft = [make_model(root / f"ft{i}", i + 1, base) for i in range(3)]
    assert len(list((root / "ft0").glob("*.safetensors"))) > 1  # multi-shard
    return root, base, ft


def run(root, tmp_path, yaml_text, *extra):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(textwrap.dedent(yaml_text))
    out = tmp_path / "out"
    rc = main(["merge", str(cfg), str(out), "--quiet", *extra])
    return rc, out


def as_jax(tree):
    return {k: jax.numpy.asarray(v) for k, v in tree.items()}


def assert_equal_trees(out_dir, expected, rtol=1e-6):
    got = load_safetensors(out_dir, lazy=False)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(np.asarray(got[k], np.float32), np.asarray(v, np.float32), rtol=rtol, atol=1e-6, err_msg=k)


CASES = {
    "ties": ("parameters: {density: 0.5, weight: 1.0}",
             lambda b, ms: merge.ties(b, ms, density=0.5)),
    "task_arithmetic": ("parameters: {weight: 0.5}\nparameters_top: {lambda: 0.8}",
                        lambda b, ms: merge.task_arithmetic(b, ms, weights=0.5, lam=0.8)),
    "dare_ties": ("parameters: {density: 0.6, weight: 0.4}",
                  None),
    "breadcrumbs": ("parameters: {density: 0.7, gamma: 0.05, weight: 1.0}",
                    lambda b, ms: merge.breadcrumbs(b, ms, density=0.7, gamma=0.05)),
    "sce": ("parameters_top: {select_topk: 0.5}", lambda b, ms: merge.sce(b, ms, select_topk=0.5)),
    "model_stock": ("", lambda b, ms: merge.model_stock(b, ms)),
    "multislerp": ("parameters: {weight: 0.5}", lambda b, ms: merge.multislerp(b, ms, weights=0.5)),
    "ramplus_tl": ("parameters_top: {r: 0.3}", lambda b, ms: merge.ramplus_tl(b, ms, r=0.3)),
    "varm": ("parameters_top: {temperature: 0.5}", lambda b, ms: merge.varm(b, ms, temperature=0.5)),
    "tsvm": ("parameters: {weight: 0.7}\nparameters_top: {sv_reduction: 0.25}",
             lambda b, ms: merge.tsvm(b, ms, weights=0.7, sv_reduction=0.25)),
}


@pytest.mark.parametrize("method", list(CASES))
def test_out_of_core_equals_in_memory(models, tmp_path, method):
    root, base, ft = models
    per_model, reference = CASES[method]
    per_model_lines = "\n".join(l for l in per_model.splitlines() if not l.startswith("parameters_top"))
    top = [l.replace("parameters_top", "parameters") for l in per_model.splitlines() if l.startswith("parameters_top")]
    entries = "\n".join(f"  - model: ft{i}\n    {per_model_lines}" if per_model_lines else f"  - model: ft{i}" for i in range(3))
    yaml_text = f"merge_method: {method}\nbase_model: base\nmodels:\n{entries}\n" + "\n".join(top) + "\n"
    cfg = root / f"{method}.yml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet", "--max-shard-size", "2000"]) == 0
    if reference is None:  # random: the run's key (seed 0) gives the in-memory result, tensor by tensor
        reference = lambda b, ms: merge.dare_ties(b, ms, density=0.6, weights=0.4, key=jax.random.key(0),
                                                  rescale="inverse")
    expected = reference(as_jax(base), [as_jax(m) for m in ft])
    assert_equal_trees(out, expected, rtol=1e-5)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "mergekit_config.yml").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS


def test_two_model_methods_with_and_without_a_base(models, tmp_path):
    root, base, ft = models
    runs = {"nuslerp": (f"models: [{{model: {root / 'ft0'}, parameters: {{weight: 1.0}}}}, "
                        f"{{model: {root / 'ft1'}, parameters: {{weight: 3.0}}}}]\nparameters: {{nuslerp_flatten: false}}",
                        lambda: merge.nuslerp(None, [as_jax(ft[0]), as_jax(ft[1])], weights=[1.0, 3.0], flatten=False)),
            "arcee_fusion": (f"base_model: {root / 'base'}\nmodels: [{{model: {root / 'ft2'}}}]",
                             lambda: merge.arcee_fusion(as_jax(base), [as_jax(ft[2])]))}
    for method, (yaml_text, reference) in runs.items():
        (tmp_path / method).mkdir()
        rc, out = run(root, tmp_path / method, f"merge_method: {method}\n{yaml_text}\n")
        assert rc == 0
        assert_equal_trees(out, reference(), rtol=1e-5)


def test_gradients_filters_and_dtype(models, tmp_path):
    root, base, ft = models
    yaml_text = f"""
        merge_method: slerp
        base_model: {root / 'base'}
        models:
          - model: {root / 'ft0'}
        parameters:
          t:
            - filter: self_attn
              value: [0.0, 1.0]
            - value: 0.5
        dtype: bfloat16
    """
    rc, out = run(root, tmp_path, yaml_text)
    assert rc == 0
    got = load_safetensors(out, lazy=False)
    assert got["lm_head.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for i, t in enumerate([0.0, 1 / 3, 2 / 3, 1.0]):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        want = merge.slerp({name: base[name]}, [{name: ft[0][name]}], t=t)[name]
        np.testing.assert_allclose(np.asarray(got[name], np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)
    name = "model.layers.1.mlp.up_proj.weight"
    want = merge.slerp({name: base[name]}, [{name: ft[0][name]}], t=0.5)[name]
    np.testing.assert_allclose(np.asarray(got[name], np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_global_ties_out_of_core(models, tmp_path):
    root, base, ft = models
    yaml_text = f"""
        merge_method: ties
        base_model: {root / 'base'}
        models:
          - model: {root / 'ft0'}
            parameters: {{density: 0.3}}
          - model: {root / 'ft1'}
            parameters: {{density: 0.3}}
        parameters: {{scope: global, normalize: false}}
    """
    rc, out = run(root, tmp_path, yaml_text)
    assert rc == 0
    expected = merge.ties(as_jax(base), [as_jax(ft[0]), as_jax(ft[1])], density=0.3, scope="global", disjoint="sum")
    assert_equal_trees(out, expected, rtol=1e-5)


def test_slices_build_a_deeper_model(models, tmp_path):
    root, base, ft = models
    yaml_text = f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {root / 'ft0'}, layer_range: [0, 3]}}]
          - sources: [{{model: {root / 'ft1'}, layer_range: [1, 4]}}]
    """
    rc, out = run(root, tmp_path, yaml_text)
    assert rc == 0
    got = load_safetensors(out, lazy=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    np.testing.assert_array_equal(got["model.layers.4.mlp.up_proj.weight"], ft[1]["model.layers.2.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], ft[0]["model.layers.0.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], ft[0]["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("merge_method: frankenstein\nbase_model: base\nmodels: [{model: ft0}]", "merge_method 'frankenstein' is not supported"),
        ("merge_method: adamerging\nbase_model: base\nmodels: [{model: ft0}]", "'adamerging' merges in memory only"),
        ("merge_method: concrete\nbase_model: base\nmodels: [{model: ft0}]", "call jmoe.merge.concrete"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0}]\nchat_template: x", "unsupported key(s) chat_template"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {t: 0.5}}]", "parameter(s) t are not used"),
        ("merge_method: ties\nmodels: [{model: ft0}]", "needs base_model"),
        ("merge_method: linear\nmodels: [{model: nowhere}]", "does not exist"),
        ("merge_method: linear\nmodels: [{model: org/model@main}]", "not supported"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {density: 1.5}}]", "density=1.5"),
        ("merge_method: tsvm\nbase_model: base\nmodels: [{model: ft0}]\nparameters: {sv_reduction: 0}",
         "sv_reduction=0 must be in (0, 1]"),
    ],
)
def test_bad_configs_are_one_line_errors(models, tmp_path, capsys, yaml_text, message):
    root, _, _ = models
    cfg = root / "bad.yml"
    cfg.write_text(yaml_text)
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_refuses_to_overwrite(models, tmp_path, capsys):
    root, _, _ = models
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    cfg = root / "lin.yml"
    cfg.write_text("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}, {model: ft1, parameters: {weight: 1}}]")
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet", "--force"]) == 0


@pytest.mark.parametrize("text, message", [("{not json", "cannot be read as JSON"), ("[1, 2]", "must hold a JSON object")])
def test_a_broken_input_config_is_named_before_any_work(models, tmp_path, capsys, text, message):
    import shutil

    root, _, _ = models
    broken = tmp_path / "broken"
    shutil.copytree(root / "ft1", broken)
    (broken / "config.json").write_text(text)
    cfg = tmp_path / "lin.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {root / 'ft0'}, parameters: {{weight: 1}}}}, "
                   f"{{model: {broken}, parameters: {{weight: 1}}}}]")
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{broken / 'config.json'} {message}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
