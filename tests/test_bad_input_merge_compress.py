"""Bad input to `jmoe merge` and `jmoe compress` (flags, YAML, checkpoints, statistics files):
exit code 2, one line on stderr, found before any expensive work, and nothing on disk changed."""

import hashlib
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.cli import main
from jmoe.io import save_safetensors
from jmoe.merge import MergeError
from tests.train.conftest import MICRO

NAMES = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.weight" for i in range(2)), "lm_head.weight"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run (4 experts per MoE layer, d_model 32, expert d_ff 32)."""
    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
                 *MICRO]) == 0
    return run


def snapshot(*roots):
    """{path: sha256 of the content, or "dir"} of everything under `roots`."""
    out = {}
    for root in roots:
        out[str(root)] = "dir"
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hf_model(path, seed, shape=(4, 2)):
    rng = np.random.default_rng(seed)
    save_safetensors({n: rng.standard_normal(shape).astype(np.float32) for n in NAMES}, path)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))


def yaml_case(text):
    """argv of `jmoe merge` over models base, ft (and odd: other shapes, empty: no tensors)."""

    def build(tmp, run):
        (tmp / "merge.yml").write_text(text)
        return ["merge", str(tmp / "merge.yml"), str(tmp / "out"), "--quiet"]

    return build


def compress_case(*flags, out="out"):
    def build(tmp, run):
        return ["compress", "--ckpt", str(run), "--out", str(tmp / out), "--calib-batches", "1", "--quiet", *flags]

    return build


def garbage_stats(tmp):
    (tmp / "garbage.npz").write_bytes(np.random.default_rng(0).bytes(512))


def foreign_npz(tmp):
    np.savez(tmp / "foreign.npz", x=np.arange(3))


def other_model_stats(tmp):
    flat = {"tokens": np.asarray(128)}
    for l in ("0", "1"):
        for k in ("top1", "topk", "top1_share", "topk_share"):
            flat[f"layers/{l}/{k}"] = np.ones(8)
        flat[f"layers/{l}/logits"] = np.zeros((4, 8), np.float32)
    np.savez_compressed(tmp / "other.npz", **flat)


def non_empty_out(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")


def file_out(tmp):
    (tmp / "out").write_text("a file")


def bad_utf8_config(tmp):
    (tmp / "merge.yml").write_bytes(b"\xff\xfe\x00garbage\x80")


LINEAR = "merge_method: linear\nmodels: [{model: ft, parameters: {weight: 1}}, {model: base, parameters: {weight: 1}}]\n"

# (id, files to create, argv builder, text the error must contain)
CASES = [
    # jmoe compress: flags
    ("target-experts 0", None, compress_case("--method", "msmoe", "--target-experts", "0"), "target_experts=0 "),
    ("target-experts 9", None, compress_case("--method", "msmoe", "--target-experts", "9"), "target_experts=9 "),
    ("target-experts -1", None, compress_case("--method", "prune", "--target-experts", "-1"), "target_experts=-1 "),
    ("target-experts nan", None, compress_case("--method", "msmoe", "--target-experts", "nan"), "target_experts=nan"),
    ("target-experts inf", None, compress_case("--method", "mcsmoe", "--target-experts", "inf", "--rank", "2",
                                                "--budget", "0.5"), "target_experts=inf"),
    ("target-experts text", None, compress_case("--method", "msmoe", "--target-experts", "two"), "invalid float value"),
    ("rank -2", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "-2", "--budget", "0.5"),
     "rank=-2"),
    ("rank 0", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "0", "--sparsity", "0.5"),
     "rank=0"),
    ("rank too large", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "99",
                                           "--sparsity", "0.5"), "rank=99"),
    ("rank missing", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--budget", "0.5"), "needs rank"),
    ("sparsity and budget", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "2",
                                                "--budget", "0.5", "--sparsity", "0.5"), "exactly one of"),
    ("sparsity 1.5", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "2",
                                         "--sparsity", "1.5"), "sparsity=1.5"),
    ("budget 0", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "2", "--budget", "0"),
     "budget=0"),
    ("budget below the factors", None, compress_case("--method", "mcsmoe", "--target-experts", "2", "--rank", "16",
                                                     "--budget", "0.1"), "below the size of the rank-16 factors"),
    ("calib-batches 0", None, compress_case("--method", "msmoe", "--target-experts", "2", "--calib-batches", "0"),
     "calib_batches=0"),
    ("rank for prune", None, compress_case("--method", "prune", "--target-experts", "2", "--rank", "2"),
     "belong to method='mcsmoe'"),
    ("router for prune", None, compress_case("--method", "prune", "--target-experts", "2", "--router", "merge"),
     "router belongs to"),
    ("align for average", None, compress_case("--method", "average", "--target-experts", "2", "--align", "activation"),
     "align belongs to"),
    ("importance for msmoe", None, compress_case("--method", "msmoe", "--target-experts", "2", "--importance",
                                                 "sensitivity"), "importance belongs to method='mcsmoe'"),
    ("unknown method", None, compress_case("--method", "squash", "--target-experts", "2"), "invalid choice"),
    ("step missing", None, compress_case("--method", "msmoe", "--target-experts", "2", "--step", "99"),
     "no checkpoint at step 99"),
    ("calib-data missing", None, lambda tmp, run: compress_case("--method", "msmoe", "--target-experts", "2",
                                                                "--calib-data", str(tmp / "nope.txt"))(tmp, run),
     "nope.txt' does not exist"),
    # jmoe compress: files
    ("stats missing", None, lambda tmp, run: compress_case("--method", "msmoe", "--target-experts", "2",
                                                           "--stats", str(tmp / "nope.npz"))(tmp, run),
     "nope.npz' do not exist"),
    ("stats binary garbage", garbage_stats, lambda tmp, run: compress_case(
        "--method", "msmoe", "--target-experts", "2", "--stats", str(tmp / "garbage.npz"))(tmp, run),
     "garbage.npz' is not routing statistics saved by jmoe compress (not an .npz file)"),
    ("stats of something else", foreign_npz, lambda tmp, run: compress_case(
        "--method", "prune", "--target-experts", "2", "--stats", str(tmp / "foreign.npz"))(tmp, run),
     "foreign.npz' is not routing statistics"),
    ("stats of another model", other_model_stats, lambda tmp, run: compress_case(
        "--method", "msmoe", "--target-experts", "2", "--stats", str(tmp / "other.npz"))(tmp, run),
     "are of another model"),
    ("ckpt not a run", None, lambda tmp, run: ["compress", "--ckpt", str(tmp), "--out", str(tmp / "out"), "--method",
                                               "msmoe", "--target-experts", "2", "--quiet"], "not a jmoe run directory"),
    ("out not empty", non_empty_out, compress_case("--method", "msmoe", "--target-experts", "2"), "is not empty"),
    ("out is a file", file_out, compress_case("--method", "msmoe", "--target-experts", "2"), "is not a directory"),
    # jmoe merge: YAML
    ("yaml density 1.5", None, yaml_case("merge_method: ties\nbase_model: base\nmodels: [{model: ft}]\n"
                                         "parameters: {density: 1.5}\n"), "density=1.5 must be in (0, 1]"),
    ("yaml model density 0", None, yaml_case("merge_method: ties\nbase_model: base\n"
                                             "models: [{model: ft, parameters: {density: [0.5, 0]}}]\n"),
     "density=0 must be in (0, 1]"),
    ("yaml unknown method", None, yaml_case("merge_method: frankenstein\nmodels: [{model: ft}]\n"),
     "merge_method 'frankenstein' is not supported"),
    ("yaml no method", None, yaml_case("models: [{model: ft}]\n"), "needs merge_method"),
    ("yaml missing model path", None, yaml_case("merge_method: linear\nmodels: [{model: nope}, {model: ft}]\n"),
     "nope' does not exist"),
    ("yaml model without path", None, yaml_case("merge_method: linear\nmodels: [{parameters: {weight: 1}}]\n"),
     "models[0] must be a mapping with a 'model' key"),
    ("yaml not yaml", None, yaml_case("merge_method: [linear\n"), "not valid YAML"),
    ("yaml not a mapping", None, yaml_case("- linear\n"), "must be a YAML mapping"),
    ("yaml not text", bad_utf8_config, lambda tmp, run: ["merge", str(tmp / "merge.yml"), str(tmp / "out"), "--quiet"],
     "cannot be read as text"),
    ("yaml weight not a number", None, yaml_case("merge_method: linear\nmodels: [{model: ft}]\n"
                                                 "parameters: {weight: heavy}\n"), "weight='heavy' is not valid"),
    ("yaml normalize not a boolean", None, yaml_case("merge_method: linear\nmodels: [{model: ft}]\n"
                                                    "parameters: {normalize: maybe}\n"),
     "normalize='maybe' is not valid ('maybe' is not a boolean (true or false))"),
    ("merge out under a file", file_out, lambda tmp, run: [*yaml_case(LINEAR)(tmp, run)[:2], str(tmp / "out" / "sub"),
                                                           "--quiet"], "is not a directory, so"),
    ("yaml bad filter", None, yaml_case("merge_method: linear\nmodels: [{model: ft}]\n"
                                        "parameters: {weight: [{filter: '[', value: 1}]}\n"),
     "not a valid regular expression"),
    ("yaml ties scope", None, yaml_case("merge_method: ties\nbase_model: base\nmodels: [{model: ft}]\n"
                                        "parameters: {scope: everywhere}\n"), "must be 'tensor' or 'global'"),
    ("yaml slerp without t", None, yaml_case("merge_method: slerp\nbase_model: base\nmodels: [{model: ft}]\n"),
     "needs parameter t"),
    ("yaml slices sources", None, yaml_case("merge_method: passthrough\nslices: [{sources: ft}]\n"),
     "slices[0].sources must be a non-empty list"),
    ("config missing", None, lambda tmp, run: ["merge", str(tmp / "nope.yml"), str(tmp / "out"), "--quiet"],
     "does not exist"),
    # jmoe merge: checkpoints and flags
    ("model without tensors", None, yaml_case("merge_method: linear\nmodels: [{model: empty}, {model: ft}]\n"),
     "no safetensors checkpoint"),
    ("models of other shapes", None, yaml_case("merge_method: linear\nmodels: [{model: odd}, {model: ft}]\n"),
     "different shapes"),
    ("merge out not empty", non_empty_out, yaml_case(LINEAR), "not empty; choose another OUT_DIR or pass --force"),
    ("merge out is a file", file_out, yaml_case(LINEAR), "is not a directory"),
    ("max shard size", None, lambda tmp, run: yaml_case(LINEAR)(tmp, run) + ["--max-shard-size", "5XB"],
     "max_shard_size='5XB'"),
]


@pytest.mark.parametrize("prepare, build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run_dir, tmp_path, capsys, prepare, build, message):
    hf_model(tmp_path / "base", 0)
    hf_model(tmp_path / "ft", 1)
    hf_model(tmp_path / "odd", 2, shape=(2, 2))
    (tmp_path / "empty").mkdir()
    if prepare is not None:
        prepare(tmp_path)
    argv = build(tmp_path, run_dir)
    before = snapshot(tmp_path, run_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if message is not None:
        assert message in err, err
    assert snapshot(tmp_path, run_dir) == before


# ------------------------------------------------------------------ the Python API


A = {"layers": {str(i): {"w": jnp.full((2, 3), float(i))} for i in range(3)}}
B = {"layers": {str(i): {"w": jnp.full((2, 3), float(i) + 1)} for i in range(3)}}


@pytest.mark.parametrize("call, message", [
    (lambda: merge.linear([A, B], weights=[1.0, 2.0, 3.0]),
     "merge method 'linear': parameter 'weights' is a list of 3 values for 2 models"),
    (lambda: merge.task_arithmetic(A, [B, B], weights=[0.5, 0.5, 0.5]),
     "merge method 'task_arithmetic': parameter 'weights' is a list of 3 values for 2 models"),
    (lambda: merge.ties(A, [B, B, B], density=[0.5, 0.5]),
     "merge method 'ties': parameter 'density' is a list of 2 values for 3 models"),
    (lambda: merge.task_arithmetic(A, [B], weights=[0.0, 1.0]),
     "merge method 'task_arithmetic': parameter 'weights' is a list of 2 values for 1 model "),
], ids=["linear", "task_arithmetic", "ties", "one model"])
def test_per_model_lists_of_the_wrong_length_are_errors(call, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as info:
        call()
    assert isinstance(info.value, MergeError) and "\n" not in str(info.value)


def test_layer_gradients_still_work():
    # a parameter that varies over layers and is not per model: a list of any length is a gradient
    out = merge.slerp(A, [B], t=[0.0, 0.5, 1.0])
    for i, t in enumerate([0.0, 0.5, 1.0]):
        np.testing.assert_allclose(out["layers"][str(i)]["w"], float(i) + t, rtol=1e-5)
    # a per-model parameter: one gradient per model, or filter entries shared by every model
    out = merge.task_arithmetic(A, [B, B], weights=[[0.0, 0.5]] * 2)
    for i, w in enumerate([0.0, 0.25, 0.5]):
        np.testing.assert_allclose(out["layers"][str(i)]["w"], float(i) + 2 * w, rtol=1e-5)
    out = merge.linear([A, B], weights=[{"filter": "layers/0/", "value": 1.0}, {"value": 3.0}], normalize=False)
    np.testing.assert_allclose(out["layers"]["0"]["w"], 0.0 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["layers"]["2"]["w"], 3 * 2.0 + 3 * 3.0, rtol=1e-6)
