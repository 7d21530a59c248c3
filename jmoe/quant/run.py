"""`jmoe quantize`: a run directory with quantized expert weights.

The new directory is a run that `jmoe eval`, `jmoe evaluate` and `jmoe generate` (with or
without offloading) read like any other. Its config.json holds the model, the data and a
`quantization` entry (method, group size, the width of every expert, the source run); its
checkpoint holds the params, with each `QuantizedArray` stored as its packed codes, scales and
zero points and a mixed-width layer's experts one by one, and the router state, but no
optimizer state: a quantized run is for inference, not for training. `report.json` has the
exact bytes before and after (scales and zero points included), the validation loss before and
after and, for MC-MoE, the allocation and the statistics it came from.

Methods: rtn, hqq (calibration-free), gptq (Hessians of the tokens each expert receives) with
one width for every expert (`bits`); mcmoe: MC-MoE's widths per expert from its integer
program under an average (`avg_bits`), then GPTQ at those widths as in the reference code.
"""

from __future__ import annotations

import math
import numbers
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from jmoe.checks import is_int
from jmoe.experts import ExpertList
from jmoe.quant.allocate import ALPHA, BETA, allocate_bits, least_average
from jmoe.quant.experts import param_bytes, quantize_lm_experts
from jmoe.quant.qarray import BITS, QuantizedArray, check_bits

METHODS = ("rtn", "hqq", "gptq", "mcmoe")
CARRIED_FILES = ("premoe.npz",)  # what a quantized run keeps of its source run's files
CALIBRATED = ("gptq", "mcmoe")


# ------------------------------------------------------------------ storage in a checkpoint


def to_storage(tree):
    """Params with `QuantizedArray`s and `ExpertList`s as plain nested dicts of arrays."""
    if isinstance(tree, QuantizedArray):
        return {"packed": tree.packed, "scale": tree.scale, "zero": tree.zero}
    if isinstance(tree, ExpertList):
        return {str(e): to_storage(x) for e, x in enumerate(tree.experts)}
    if isinstance(tree, dict):
        return {k: to_storage(v) for k, v in tree.items()}
    return tree


def from_storage(stored, like):
    """The inverse of `to_storage`, shaped like `like` (the abstract quantized params)."""
    if isinstance(like, QuantizedArray):
        return QuantizedArray(stored["packed"], stored["scale"], stored["zero"], like.bits, like.group_size)
    if isinstance(like, ExpertList):
        return ExpertList(from_storage(stored[str(e)], x) for e, x in enumerate(like.experts))
    if isinstance(like, dict):
        return {k: from_storage(stored[k], v) for k, v in like.items()}
    return stored


def widths(quantization: dict) -> dict[str, list[int]]:
    """{layer: [bits per expert]} of a run's `quantization` entry."""
    return {str(k): [int(b) for b in v] for k, v in quantization["bits"].items()}


def abstract_params(model_cfg, quantization: dict):
    """The quantized params' structure, shapes and dtypes, without computing anything."""
    from jmoe.nn.transformer import init_lm

    return jax.eval_shape(lambda: quantize_lm_experts(init_lm(jax.random.key(0), model_cfg), widths(quantization),
                                                      group_size=int(quantization["group_size"]), method="rtn"))


def abstract_state(model_cfg, quantization: dict, router_state_like=None) -> dict:
    """The checkpoint's tree: {"params": stored params, "router_state"?}."""
    state = {"params": to_storage(abstract_params(model_cfg, quantization))}
    if router_state_like is not None:
        state["router_state"] = router_state_like
    return state


# ------------------------------------------------------------------ checks


def _check_int(name, value, lo):
    if not is_int(value) or value < lo:
        raise ValueError(f"{name}={value!r} must be an integer >= {lo}")


def default_candidates(avg_bits: float) -> tuple[int, ...]:
    """MC-MoE's widths around the budget: (1, 2, 3) for 1.5-2.5 bits, (2, 3, 4) for 3 bits;
    the supported widths within one of floor(avg_bits), else the two that enclose it ((4, 8)
    for 6 bits)."""
    f = math.floor(avg_bits + 1e-9)
    near = tuple(b for b in BITS if f - 1 <= b <= f + 1)
    below, above = [b for b in BITS if b <= avg_bits], [b for b in BITS if b >= avg_bits]
    return near or tuple(sorted({*below[-1:], *above[:1]}))


def check_request(model_cfg, *, method: str, bits: int | None, avg_bits: float | None, group_size: int,
                  candidates: Sequence[int] | None, source: str) -> tuple[int, ...]:
    """ValueError (one line) for a request this model cannot take; the MC-MoE candidates."""
    cands = _check_widths(model_cfg, method=method, bits=bits, avg_bits=avg_bits, candidates=candidates, source=source)
    _check_int("group_size", group_size, 1)
    for i in model_cfg.moe_layers:
        moe = model_cfg.moe_for(i)
        for axis, size in (("d_model", moe.d_model), ("d_ff", moe.d_ff)):
            if size % group_size:
                raise ValueError(f"--group-size {group_size} does not divide the experts' {axis}={size} "
                                 f"(layer {i})")
    return cands


def _check_widths(model_cfg, *, method, bits, avg_bits, candidates, source) -> tuple[int, ...]:
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is unknown; known: {', '.join(METHODS)}")
    if model_cfg.moe is None or not model_cfg.moe_layers:
        raise ValueError(f"{source} is a dense model: there are no experts to quantize")
    if method == "mcmoe":
        if bits is not None:
            raise ValueError("--method mcmoe picks a width per expert: give --avg-bits, not --bits")
        if avg_bits is None:
            raise ValueError("--method mcmoe needs --avg-bits (the average width of the experts)")
        if not (isinstance(avg_bits, numbers.Real) and math.isfinite(avg_bits) and avg_bits > 0):
            raise ValueError(f"--avg-bits {avg_bits!r} must be a positive number")
        cands = tuple(sorted(int(check_bits(int(b), "--candidates")) for b in (candidates or default_candidates(avg_bits))))
        if len(set(cands)) != len(cands):
            raise ValueError(f"--candidates {cands} repeats a width")
        if avg_bits > max(cands) + 1e-9:
            raise ValueError(f"--avg-bits {avg_bits:g} is above the widest width {max(cands)} of {cands}: every "
                             f"expert would get {max(cands)} bits (ask for that with --method hqq --bits {max(cands)})")
        E = min(model_cfg.moe_for(i).num_experts for i in model_cfg.moe_layers)
        least = least_average(cands, E)
        if avg_bits < least - 1e-9:
            raise ValueError(f"--avg-bits {avg_bits:g}: no allocation of widths {cands} to {E} experts meets it "
                             f"(the least is {least:g})")
        return cands
    if avg_bits is not None:
        raise ValueError(f"--avg-bits is for --method mcmoe; --method {method} gives every expert --bits")
    if candidates:
        raise ValueError(f"--candidates is for --method mcmoe, not {method}")
    if bits is None:
        raise ValueError(f"--method {method} needs --bits ({', '.join(map(str, BITS))})")
    check_bits(bits, "--bits")
    return ()


# ------------------------------------------------------------------ the command


def quantize_run(ckpt: str | Path, out: str | Path, *, method: str = "hqq", bits: int | None = None,
                 avg_bits: float | None = None, group_size: int = 64, candidates: Sequence[int] | None = None,
                 per_layer: bool = True, alpha: float = ALPHA, beta: float = BETA, skip_ratio: float | None = None,
                 calib_batches: int = 8, calib_data: str | None = None, step: int | None = None, seed: int = 0,
                 log: Callable[[str], None] = print) -> dict:
    """Quantize the experts of the run in `ckpt` and write the result as a run in `out`.

    method: rtn | hqq | gptq with `bits` for every expert, or mcmoe with `avg_bits` (MC-MoE:
    widths from `candidates`, default `default_candidates(avg_bits)`, by its integer program
    per layer (`per_layer`) or over all layers, then GPTQ). skip_ratio: store online expert
    skipping in the new run's model config. Calibration (gptq, mcmoe): `calib_batches`
    training batches of the run's corpus (or `calib_data`).

    Everything is checked before the model is loaded (one-line ValueErrors): the run exists
    and is not quantized already, the method and widths, the group size against the experts'
    widths, an average no allocation can meet; `out` must not exist or be empty. The run is
    written in a temporary sibling of `out` and renamed into place at the end.
    """
    from jmoe.data import eval_batches, load_corpus, train_batch
    from jmoe.merge.staging import check_output_dir, staged_dir
    from jmoe.quant.calibration import calibrate
    from jmoe.train import rundir
    from jmoe.train.trainer import evaluate

    source = str(ckpt)
    saved, _ = rundir.find_checkpoint(ckpt, step)
    if "quantization" in saved:
        q = saved["quantization"]
        raise ValueError(f"{source} is already quantized ({q.get('method')}, {q.get('avg_bits', '?')} bits "
                         "on average); quantize its source run instead")
    model_cfg, tc, _ = rundir.read_config(ckpt)
    cands = check_request(model_cfg, method=method, bits=bits, avg_bits=avg_bits, group_size=group_size,
                          candidates=candidates, source=source)
    _check_int("calib_batches", calib_batches, 1)
    if skip_ratio is not None and not (isinstance(skip_ratio, numbers.Real) and 0.0 <= skip_ratio <= 1.0):
        raise ValueError(f"--skip-ratio {skip_ratio!r} must be in [0, 1]")
    if calib_data is not None and not Path(calib_data).exists():
        raise ValueError(f"calibration data {str(calib_data)!r} does not exist")
    out = check_output_dir(out)

    t0 = time.perf_counter()
    model_cfg, tc, params, router_state, saved, step = rundir.load_run(ckpt, step)
    corpus = load_corpus(calib_data if calib_data is not None else tc.data)
    report: dict = {"source": str(Path(ckpt).absolute()), "step": step, "method": method, "group_size": group_size}
    calibration = None
    if method in CALIBRATED:
        calib = [train_batch(corpus.train, seed + 7919, i, tc.batch_size, tc.seq_len) for i in range(calib_batches)]
        log(f"calibrating on {calib_batches} batches of {corpus.source}")
        calibration = calibrate(params, model_cfg, calib, router_state=router_state, candidates=cands,
                                group_size=group_size)
        report["calibration"] = {"batches": calib_batches, "data": corpus.source, "tokens": calibration["tokens"]}
    layers = [str(i) for i in model_cfg.moe_layers]
    if method == "mcmoe":
        stats = calibration["layers"]
        allocation = _allocate(stats, layers, avg_bits, cands, per_layer, alpha, beta)
        report["allocation"] = {"avg_bits": avg_bits, "candidates": list(cands), "per_layer": per_layer,
                                "alpha": alpha, "beta": beta,
                                "frequency": {l: stats[l]["frequency"].tolist() for l in layers},
                                "weight": {l: stats[l]["weight"].tolist() for l in layers},
                                "loss": {l: stats[l]["loss"].tolist() for l in layers}}
        quantizer = "gptq"
    else:
        allocation = {l: [int(bits)] * model_cfg.moe_for(int(l)).num_experts for l in layers}
        quantizer = method
    log(f"quantizing the experts ({method}, group size {group_size})")
    qparams = quantize_lm_experts(params, allocation, group_size=group_size, method=quantizer, calibration=calibration)
    qparams = jax.block_until_ready(qparams)
    new_cfg = model_cfg if skip_ratio is None else model_cfg.with_moe(skip_ratio=float(skip_ratio))

    n_experts = sum(len(v) for v in allocation.values())
    quantization = {"method": method, "group_size": group_size, "bits": allocation,
                    "avg_bits": sum(sum(v) for v in allocation.values()) / n_experts, "source": report["source"],
                    "step": step}
    experts_before = sum(param_bytes(params["layers"][l]["moe"]["experts"]) for l in layers)
    experts_after = sum(param_bytes(qparams["layers"][l]["moe"]["experts"]) for l in layers)
    val = eval_batches(corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    log("validation before and after")
    ev_before = evaluate(params, router_state, model_cfg, val)
    ev_after = evaluate(qparams, router_state, new_cfg, val)
    report.update({
        "avg_bits": quantization["avg_bits"], "bits": allocation,
        "bytes_before": param_bytes(params), "bytes_after": param_bytes(qparams),
        "expert_bytes_before": experts_before, "expert_bytes_after": experts_after,
        "expert_bits_per_weight": 8 * experts_after / sum(
            int(np.prod(np.shape(w))) for l in layers for w in jax.tree.leaves(params["layers"][l]["moe"]["experts"])),
        "val_loss_before": ev_before["val_loss"], "val_loss_after": ev_after["val_loss"],
    })
    if "skip_rate" in ev_after:
        report["skip_ratio"], report["skip_rate"] = skip_ratio, ev_after["skip_rate"]
    state = {"params": to_storage(qparams)}
    if router_state:
        state["router_state"] = router_state
    with staged_dir(out) as tmp:
        store = rundir.checkpoint_store(tmp, keep=1)
        try:
            store.save(step, state, {"step": step, "quantized_from": report["source"]})
        finally:
            store.close()
        kept = {k: v for k, v in saved.items() if k not in ("model", "train", "data", "jmoe_version")}
        rundir.write_config(tmp, new_cfg, tc, saved.get("data", {}), **kept, quantization=quantization)
        for name in CARRIED_FILES:  # e.g. PreMoe's task statistics
            if (Path(ckpt) / name).is_file():
                shutil.copy(Path(ckpt) / name, tmp / name)
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"expert bytes {experts_before:,} -> {experts_after:,} ({report['expert_bits_per_weight']:.2f} bits per "
        f"weight); all params {report['bytes_before']:,} -> {report['bytes_after']:,} bytes; validation loss "
        f"{ev_before['val_loss']:.4f} -> {ev_after['val_loss']:.4f}; wrote {out}")
    return report


def _allocate(stats: dict, layers: list[str], avg_bits: float, cands, per_layer: bool, alpha: float,
              beta: float) -> dict[str, list[int]]:
    """MC-MoE's {layer: [width per expert]} from the calibration statistics (one program over
    all layers needs equal expert counts; otherwise each layer is allocated on its own)."""
    if len({len(stats[l]["frequency"]) for l in layers}) == 1:
        f = np.stack([stats[l]["frequency"] for l in layers])
        w = np.stack([stats[l]["weight"] for l in layers])
        loss = np.stack([stats[l]["loss"] for l in layers])
        alloc = allocate_bits(f, w, loss, avg_bits, candidates=cands, alpha=alpha, beta=beta, per_layer=per_layer)
        return {l: [int(b) for b in row] for l, row in zip(layers, alloc)}
    return {l: [int(b) for b in allocate_bits(stats[l]["frequency"][None], stats[l]["weight"][None],
                                              stats[l]["loss"][None], avg_bits, candidates=cands, alpha=alpha,
                                              beta=beta)[0]] for l in layers}


def load_quantized(run, chosen: int, model_cfg, quantization: dict, router_state_like) -> tuple[dict, dict | None]:
    """(params, router_state) of a quantized run's checkpoint, on one device."""
    from jmoe.train import rundir

    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = abstract_params(model_cfg, quantization)
    abstract = abstract_state(model_cfg, quantization, router_state_like)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    state, _ = rundir.restore_state(run, chosen, abstract)
    return from_storage(state["params"], like), state.get("router_state")


def dequantized(params):
    """Params with every quantized weight as a float array (stacked experts)."""
    from jmoe.experts import stacked_experts

    def walk(t):
        if isinstance(t, ExpertList):
            return walk(stacked_experts(t))
        if isinstance(t, QuantizedArray):
            return t.dequantize()
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        return t

    return walk(params)


