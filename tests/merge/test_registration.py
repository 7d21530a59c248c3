"""A merge method defined outside the package is one function plus one registration: then
`jmoe.merge.<name>`, mergekit configurations and `jmoe merge` (out of core) all take it.
The compress-method table feeds `compress_run` and `jmoe compress --method`."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.cli import build_parser, main
from jmoe.io import load_safetensors, save_safetensors
from jmoe.merge import MERGE_METHODS, MergeError, Param, map_merge, register_merge_method
from jmoe.merge.experts.registry import COMPRESS_METHODS, check_options
from jmoe.merge.mergekit import parse_config, supported_methods
from jmoe.merge.tree import resolve

NAME = "toy_pull"


def toy_pull(base, models, *, t=0.5, offset=0.0, filter=None, num_layers=None):
    """base + t * (mean(models) - base) + offset."""

    def leaf(path, layers, b, xs, _k):
        tv = float(resolve(t, path, layers, "t"))
        mean = sum(jnp.asarray(x, jnp.float32) for x in xs) / len(xs)
        b32 = jnp.asarray(b, jnp.float32)
        return (b32 + tv * (mean - b32) + offset).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@pytest.fixture
def toy():
    method = register_merge_method(toy_pull, Param("t", layered=True, convert=float), Param("offset", convert=float),
                                   name=NAME, mergekit=True)
    try:
        yield method
    finally:
        MERGE_METHODS.remove(NAME)
    assert NAME not in MERGE_METHODS and NAME not in supported_methods()


def toy_reference(base, models, t, offset=0.0):
    mean = sum(np.asarray(m, np.float64) for m in models) / len(models)
    return np.asarray(base, np.float64) + t * (mean - np.asarray(base, np.float64)) + offset


def test_python_api_reads_the_table(toy):
    rng = np.random.default_rng(0)
    base = {"layers": {str(i): {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)} for i in range(3)}}
    models = [{"layers": {k: {"w": v["w"] + 0.5 * (j + 1)} for k, v in base["layers"].items()}} for j in range(2)]
    assert merge.toy_pull is toy and toy.base and toy.mergekit and NAME in dir(merge)
    out = merge.toy_pull(base, models, t=[0.0, 1.0], offset=0.25)  # a gradient over the 3 layers
    for i, t in enumerate([0.0, 0.5, 1.0]):
        want = toy_reference(base["layers"][str(i)]["w"], [m["layers"][str(i)]["w"] for m in models], t, 0.25)
        np.testing.assert_allclose(np.asarray(out["layers"][str(i)]["w"]), want, rtol=1e-6, atol=1e-6)
    assert toy.params["t"].default == 0.5 and toy.params["offset"].key == "offset"
    assert toy.params["filter"].key is None  # not declared: not readable from a configuration
    with pytest.raises(MergeError, match=r"merge method 'toy_pull' has no parameter 'bogus'"):
        merge.toy_pull(base, models, bogus=1)
    with pytest.raises(MergeError, match=r"merge method 'toy_pull': parameter 'offset' cannot vary over layers"):
        merge.toy_pull(base, models, offset=[0.0, 1.0])


def _checkpoint(path, tree):
    save_safetensors(tree, path)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))


def test_merge_configuration_and_cli_read_the_table(toy, tmp_path):
    rng = np.random.default_rng(1)
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.weight" for i in range(3)), "lm_head.weight"]
    base = {n: rng.standard_normal((4, 2)).astype(np.float32) for n in names}
    ft = {n: base[n] + rng.standard_normal((4, 2)).astype(np.float32) for n in names}
    _checkpoint(tmp_path / "base", base)
    _checkpoint(tmp_path / "ft", ft)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: {NAME}\nbase_model: base\nmodels:\n  - model: ft\n"
                   "parameters:\n  t: [0.0, 1.0]\n  offset: 1\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    got = load_safetensors(tmp_path / "out", lazy=False)
    # t along the layer stack: embeddings 0, layers 0, 0.5, 1, other tensors 1
    for n, t in zip(names, [0.0, 0.0, 0.5, 1.0, 1.0]):
        np.testing.assert_allclose(np.asarray(got[n], np.float64), toy_reference(base[n], [ft[n]], t, 1.0),
                                   rtol=1e-6, atol=1e-6, err_msg=n)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert NAME in supported_methods() and parse_config(cfg).spec is toy


@pytest.mark.parametrize("params, message", [
    ("{offset: [0, 1]}", "parameters.offset: merge method 'toy_pull': parameter 'offset' cannot vary over layers"),
    ("{density: 0.5}", "parameter(s) density are not used by merge_method 'toy_pull' (it reads offset, t)"),
])
def test_configuration_parameters_are_checked_against_the_table(toy, tmp_path, capsys, params, message):
    for d in ("base", "ft"):
        _checkpoint(tmp_path / d, {"w": np.zeros((2, 2), np.float32)})
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: {NAME}\nbase_model: base\nmodels: [{{model: ft}}]\nparameters: {params}\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_registration_errors_and_methods_outside_configurations(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method(toy_pull, name="ties")
    with pytest.raises(ValueError, match="Param 'density' is not a keyword-only parameter"):
        register_merge_method(toy_pull, Param("density"), name="toy_bad")
    assert "toy_bad" not in MERGE_METHODS
    # in the table, but not tensor by tensor: jmoe merge refuses it by name
    assert "fisher" in MERGE_METHODS and "fisher" not in supported_methods()
    with pytest.raises(MergeError, match="merge_method 'fisher' merges in memory only"):
        parse_config({"merge_method": "fisher", "models": [{"model": str(tmp_path)}]})


def test_every_method_is_an_attribute_and_configurations_see_the_mergekit_ones():
    for name in MERGE_METHODS:
        assert getattr(merge, name) is MERGE_METHODS.get(name)
    assert {"linear", "slerp", "ties", "dare_ties", "dare_linear", "della_linear", "passthrough"} <= set(supported_methods())
    assert MERGE_METHODS.get("ties").config_params["lambda"].name == "lam"
    with pytest.raises(AttributeError, match="no attribute 'frankenstein'"):
        merge.frankenstein


def test_compress_cli_choices_come_from_the_table():
    parser = build_parser()
    compress = next(a for a in parser._subparsers._group_actions[0].choices["compress"]._actions if a.dest == "method")
    # the table's methods, then PreMoe, which stores task subsets with the whole model instead of reducing it
    assert COMPRESS_METHODS.names() == ["average", "mcsmoe", "msmoe", "prune", "random"]
    assert list(compress.choices) == [*COMPRESS_METHODS.names(), "premoe"]
    assert check_options("mcsmoe", rank=4, budget=0.3).low_rank
    assert not check_options("prune").merges
    with pytest.raises(ValueError, match="method='ties' must be one of average, mcsmoe"):
        check_options("ties")
    with pytest.raises(ValueError, match="belong to method='mcsmoe', not 'prune'"):
        check_options("prune", rank=2)
