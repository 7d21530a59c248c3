"""Calibration against direct references, and `jmoe quantize` -> `jmoe eval` / `generate`
(resident and offloaded) on a micro run, with exact byte counts and bad input refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.cli import main
from jmoe.experts import ExpertList, ffn
from jmoe.quant import QuantizedArray, calibrate, quantize_rtn


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "6", "--eval-every", "6", "--ckpt-every", "6", "--quiet",
                 *MICRO]) == 0
    return run


def test_calibration_statistics_equal_direct_computations(source_run):
    from jmoe.data import load_corpus, train_batch
    from jmoe.nn.transformer import lm_apply
    from jmoe.train import load_run

    cfg, tc, params, state, _, _ = load_run(source_run)
    corpus = load_corpus(tc.data)
    batch = train_batch(corpus.train, 1, 0, 4, 32)
    stats = calibrate(params, cfg, [batch], router_state=state, candidates=(2, 3), group_size=16)
    _, aux = lm_apply(params, jnp.asarray(batch[:, :cfg.max_seq_len]), cfg, state=state, keep_moe_inputs=True)
    for l, x, a in zip(map(str, cfg.moe_layers), aux.moe_inputs, aux.moe):
        s = stats["layers"][l]
        x = np.asarray(x.reshape(-1, x.shape[-1]), np.float64)
        ids, mask = np.asarray(a.routing.expert_ids), np.asarray(a.routing.mask)
        probs, w = np.asarray(a.routing.probs), np.asarray(a.routing.weights)
        E = cfg.moe.num_experts
        np.testing.assert_allclose(s["frequency"], np.bincount(ids[mask], minlength=E))
        weight = np.zeros(E)
        np.add.at(weight, ids[mask], np.take_along_axis(probs, ids, 1)[mask])
        np.testing.assert_allclose(s["weight"], weight, rtol=1e-5)
        experts = params["layers"][l]["moe"]["experts"]
        for e in (0, E - 1):
            rows = (mask & (ids == e)).any(1)
            np.testing.assert_allclose(s["h_in"][e], x[rows].T @ x[rows], rtol=1e-4, atol=1e-4)
            one = jax.tree.map(lambda a, e=e: a[e], experts)
            hid = np.asarray(jax.nn.silu(x[rows] @ one["w_gate"]) * (x[rows] @ one["w_up"]), np.float64)
            np.testing.assert_allclose(s["h_hidden"][e], hid.T @ hid, rtol=1e-3, atol=1e-4)
            # the loss: the layer rerun with expert e alone quantized to 2 bits
            q = dict(experts)
            for name in ("w_gate", "w_up", "w_down"):
                q[name] = experts[name].at[e].set(quantize_rtn(experts[name][e], 2, 16).dequantize())
            combine = np.asarray(a.routing.combine_weights(E))
            y = np.stack([np.asarray(ffn(jax.tree.map(lambda a, k=k: a[k], experts), jnp.asarray(x, jnp.float32),
                                         "swiglu")) for k in range(E)], 1)
            yq = y.copy()
            yq[:, e] = np.asarray(ffn(jax.tree.map(lambda a: a[e], q), jnp.asarray(x, jnp.float32), "swiglu"))
            ref = np.linalg.norm(np.einsum("te,ted->td", combine, yq - y))
            np.testing.assert_allclose(s["loss"][e, 0], ref, rtol=1e-3)


def _eval(run, capsys, *extra):
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "2", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_quantized_runs_are_read_by_eval_and_generate(source_run, tmp_path, capsys):
    base = _eval(source_run, capsys)
    out = tmp_path / "q4"
    assert main(["quantize", "--ckpt", str(source_run), "--out", str(out), "--bits", "4", "--group-size", "16",
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"]["method"] == "hqq" and saved["quantization"]["avg_bits"] == 4
    # exact bytes: 4-bit codes plus a float32 scale and zero per 16 weights = 4 + 64/16 bits per weight
    assert report["expert_bits_per_weight"] == pytest.approx(4 + 64 / 16)
    assert report["bytes_before"] - report["bytes_after"] == report["expert_bytes_before"] - report["expert_bytes_after"]
    ev = _eval(out, capsys)
    assert ev["val_loss"] == pytest.approx(report["val_loss_after"], rel=1e-6)
    assert abs(ev["val_loss"] - base["val_loss"]) < 0.05

    from jmoe.train import load_run

    _, _, params, _, _, _ = load_run(out)
    w = params["layers"]["0"]["moe"]["experts"]["w_up"]
    assert isinstance(w, QuantizedArray) and w.bits == 4 and w.group_size == 16
    # everything but the routed experts stays in the model's dtype
    others = {k: v for k, v in params["layers"]["0"].items() if k != "moe"}
    others["router"] = params["layers"]["0"]["moe"]["router"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(others))

    gen = ["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0", "--json",
           "--quiet"]
    capsys.readouterr()
    assert main(gen) == 0
    resident = json.loads(capsys.readouterr().out.splitlines()[0])
    assert main([*gen, "--offload-experts", "--expert-cache", "2"]) == 0
    offloaded = json.loads(capsys.readouterr().out.splitlines()[0])
    assert offloaded["token_ids"] == resident["token_ids"] and len(resident["token_ids"]) == 6

    # a quantized run cannot be trained or quantized again
    assert main(["train", "--resume-from", str(out), "--out", str(tmp_path / "ft"), "--steps", "2", "--quiet"]) == 2
    assert not (tmp_path / "ft").exists()
    again = tmp_path / "again"
    assert main(["quantize", "--ckpt", str(out), "--out", str(again), "--bits", "2"]) == 2
    assert "already quantized" in capsys.readouterr().err and not again.exists()


def test_mcmoe_mixed_widths_gptq_and_skipping(source_run, tmp_path, capsys):
    out = tmp_path / "mc"
    assert main(["quantize", "--ckpt", str(source_run), "--out", str(out), "--method", "mcmoe", "--avg-bits", "2.5",
                 "--group-size", "16", "--calib-batches", "2", "--skip-ratio", "0.99", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    for widths in report["bits"].values():
        assert np.mean(widths) <= 2.5 and 3 in widths and 2 in widths
    assert report["allocation"]["candidates"] == [1, 2, 3]
    assert 0 < report["skip_rate"] <= 0.5  # k = 2: the top slot is never skipped
    from jmoe.train import load_run

    cfg, _, params, _, _, _ = load_run(out)
    assert cfg.moe.skip_ratio == 0.99
    experts = params["layers"]["0"]["moe"]["experts"]
    assert isinstance(experts, ExpertList)
    assert sorted({e["w_up"].bits for e in experts.experts}) == sorted(set(report["bits"]["0"]))
    ev = _eval(out, capsys)
    assert ev["skip_rate"] == pytest.approx(report["skip_rate"]) and np.isfinite(ev["val_loss"])
    ev0 = _eval(out, capsys, "--skip-ratio", "0")
    assert "skip_rate" not in ev0 and ev0["val_loss"] != ev["val_loss"]
    capsys.readouterr()
    gen = ["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0", "--json",
           "--quiet"]
    assert main(gen) == 0
    resident = json.loads(capsys.readouterr().out.splitlines()[0])
    assert main([*gen, "--offload-experts", "--expert-cache", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"] == resident["token_ids"]

    gptq = tmp_path / "gptq"
    assert main(["quantize", "--ckpt", str(source_run), "--out", str(gptq), "--method", "gptq", "--bits", "3",
                 "--group-size", "16", "--calib-batches", "2", "--quiet"]) == 0
    assert np.isfinite(json.loads((gptq / "report.json").read_text())["val_loss_after"])


@pytest.mark.parametrize("argv, message", [
    (["--bits", "5", "--group-size", "16"], "bits=5 is not supported"),
    (["--method", "mcmoe", "--avg-bits", "1.2"], "no allocation"),
    (["--method", "mcmoe", "--avg-bits", "9"], "above the widest width 8 of (8,)"),
    (["--method", "mcmoe", "--avg-bits", "3", "--candidates", "1,2"], "above the widest width 2 of (1, 2)"),
    (["--method", "mcmoe", "--bits", "2"], "give --avg-bits"),
    (["--method", "hqq", "--avg-bits", "2.5"], "is for --method mcmoe"),
    (["--bits", "4", "--group-size", "24"], "does not divide"),
    (["--method", "rtn", "--group-size", "16"], "needs --bits"),
    (["--method", "mcmoe", "--avg-bits", "2.5", "--candidates", "2,5"], "5 is not supported"),
])
def test_bad_requests_are_one_line_and_write_nothing(source_run, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["quantize", "--ckpt", str(source_run), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_mcmoe_candidates_enclose_the_budget():
    from jmoe.quant.run import default_candidates

    assert default_candidates(2.5) == (1, 2, 3) and default_candidates(3) == (2, 3, 4)
    assert default_candidates(6) == (4, 8) and default_candidates(8) == (8,)


def test_a_dense_model_has_nothing_to_quantize(tmp_path, capsys):
    from tests.train.conftest import MICRO

    run = tmp_path / "dense"
    dense_flags = [a for pair in zip(MICRO[::2], MICRO[1::2]) if not pair[1].startswith("moe.") for a in pair]
    assert main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
                 "--dense", *dense_flags]) == 0
    assert main(["quantize", "--ckpt", str(run), "--out", str(tmp_path / "q"), "--bits", "4"]) == 2
    assert "dense model" in capsys.readouterr().err
