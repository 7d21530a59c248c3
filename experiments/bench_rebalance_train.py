"""Training steps with and without rebalancing, on a model whose routers are skewed.

On 8 simulated CPU devices (data=1,expert=8, padded all-to-all), a small MoE language model (2
MoE layers, E=16, k=2, DeepSeek-V3's sigmoid router) whose selection bias favours a few experts
(it stays: the bias update rate is 0) trains from the same initialisation twice, one step of
each in turn: on the default layout, and re-placing its experts by EPLB with 8 redundant slots
every `--every` steps from the loads of the steps since the last re-placement (`jmoe train
--rebalance-every`: the experts held in their slots, a re-placement moving their weights and
Adam moments). The rebalancing run's step time includes its re-placements.

Printed side by side, for the dropless dispatch and for capacity factor 1.25 (where a skewed
layer drops token-slots): the median ratio of the rebalancing run's step time to the plain
run's (and of the whole runs' times, re-placements included), the time one re-placement takes,
the hottest device's excess load ((max - mean) / mean of the token-slots each device receives)
of both runs over the steps after the first re-placement, the share of token-slots dropped, and
the largest relative difference between the two runs' losses (dropless: the same numbers).
Simulated devices share the machine's cores and the padded buffers do not shrink with balance,
so the step times do not show the balance; on real devices a step waits for the hottest one.
Writes experiments/results/bench_rebalance_train.json.

    python experiments/bench_rebalance_train.py [--steps 30 --every 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np

import jmoe  # noqa: E402
from jmoe.data import load_corpus, train_batch  # noqa: E402
from jmoe.nn import LMConfig  # noqa: E402
from jmoe.parallel.placement import ExpertPlacement, excess_load  # noqa: E402
from jmoe.train import TrainConfig, rebalance  # noqa: E402
from jmoe.train.state import abstract_train_state, init_train_state, make_optimizer  # noqa: E402
from jmoe.train.trainer import Placement, make_train_step  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_rebalance_train.json"
E, DEVICES, REDUNDANT = 16, 8, 8


def model(dispatch: str) -> LMConfig:
    opts = dict(capacity_factor=1.25) if dispatch == "capacity" else {}
    moe = jmoe.MoEConfig(num_experts=E, top_k=2, d_model=128, d_ff=256, router="sigmoid_bias",
                         router_options=dict(bias_update_rate=0.0), dispatch=dispatch, dispatch_options=opts)
    return LMConfig(d_model=128, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128, moe=moe)


def skewed(state: dict, model_cfg: LMConfig) -> dict:
    """The state with each MoE layer's selection bias favouring its low-numbered experts."""
    bias = 0.4 * jnp.exp(-jnp.arange(E) / 3.0)  # sigmoid scores start near 0.5
    rs = dict(state["router_state"])
    for i in model_cfg.moe_layers:
        rs[str(i)] = {**rs[str(i)], "bias": jax.device_put(bias.astype(rs[str(i)]["bias"].dtype),
                                                           rs[str(i)]["bias"].sharding)}
    return dict(state, router_state=rs)


def start(model_cfg: LMConfig, tc: TrainConfig):
    """(jitted train step, state, placement, state shardings) of a run as `jmoe train` starts it."""
    placement = Placement(tc.mesh, tc)
    tx, schedule = make_optimizer(tc)
    shardings = placement.shardings(rebalance.held_layout(abstract_train_state(model_cfg, tc), tc))
    state = jax.jit(lambda: rebalance.to_slots(init_train_state(model_cfg, tc, tx)), out_shardings=shardings)()
    return make_train_step(model_cfg, tx, schedule, placement, shardings), skewed(state, model_cfg), placement, shardings


def excess(load: np.ndarray, slots: list[np.ndarray] | None) -> float:
    """Mean over the MoE layers of the hottest device's excess load of one step's loads [L, E]."""
    rows = np.stack(slots) if slots is not None else np.tile(np.arange(E), (load.shape[0], 1))
    return float(excess_load(ExpertPlacement(slots=rows, num_experts=E, num_devices=DEVICES), load).mean())


def run(dispatch: str, steps: int, every: int, corpus) -> dict:
    model_cfg = model(dispatch)
    tc = TrainConfig(steps=steps, batch_size=16, seq_len=128, mesh=f"data=1,expert={DEVICES}", ep_impl="padded",
                     warmup_steps=2)
    rtc = tc.replace(rebalance_every=every, redundant_experts=REDUNDANT)
    runs = {"plain": start(model_cfg, tc), "rebalance": start(model_cfg, rtc)}
    move = jax.jit(rebalance.moved, out_shardings=runs["rebalance"][3], donate_argnums=0)
    states = {k: r[1] for k, r in runs.items()}
    times = {k: [] for k in runs}
    replace_s, losses, excesses, dropped = [], {k: [] for k in runs}, {k: [] for k in runs}, {k: [] for k in runs}
    for step in range(steps):
        host = train_batch(corpus.train, tc.seed, step, tc.batch_size, tc.seq_len)
        for k, (train_step, _, placement, _) in runs.items():  # one step of each in turn
            slots = ([np.asarray(states[k]["router_state"][f"{rebalance.SLOTS}{i}"]) for i in model_cfg.moe_layers]
                     if k == "rebalance" else None)
            t0 = time.perf_counter()
            states[k], m = train_step(states[k], placement.batch(host))
            m = jax.device_get(m)
            if k == "rebalance" and (step + 1) % every == 0:
                t1 = time.perf_counter()
                states[k] = jax.block_until_ready(rebalance.re_placed(states[k], model_cfg, rtc, move)[0])
                replace_s.append(time.perf_counter() - t1)
            if step > 0:  # the first step compiles
                times[k].append(time.perf_counter() - t0)
            losses[k].append(float(m["loss"]))
            dropped[k].append(float(np.mean(m["dropped"])))
            if step >= every:  # after the first re-placement
                counts = np.asarray(m["load"], np.float64)[:, :E]
                excesses[k].append(excess(counts, slots))
    ratios = [r / p for r, p in zip(times["rebalance"], times["plain"])]
    row = {"dispatch": dispatch, "step_s": {k: statistics.median(v) for k, v in times.items()},
           "ratio_rebalance_over_plain": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
           "total_ratio": sum(times["rebalance"]) / sum(times["plain"]), "replace_s": statistics.median(replace_s),
           "replacements": len(replace_s),
           "excess_load": {k: float(np.mean(v)) for k, v in excesses.items()},
           "dropped_fraction": {k: float(np.mean(v[every:])) for k, v in dropped.items()},
           "loss_max_rel_diff": float(np.max(np.abs(np.subtract(losses["rebalance"], losses["plain"]))
                                             / np.abs(losses["plain"])))}
    print(f"{dispatch:>9}: step rebalancing / plain {row['ratio_rebalance_over_plain']:.2f}x "
          f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}), whole run {row['total_ratio']:.2f}x, "
          f"a re-placement {row['replace_s'] * 1e3:.0f} ms; excess load {row['excess_load']['plain']:.2f} -> "
          f"{row['excess_load']['rebalance']:.2f}; dropped {row['dropped_fraction']['plain']:.1%} -> "
          f"{row['dropped_fraction']['rebalance']:.1%}; losses differ by {row['loss_max_rel_diff']:.1e} (relative)",
          flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    a = ap.parse_args(argv)
    if jax.device_count() < DEVICES:
        sys.exit("needs 8 devices: run as a fresh process (it sets XLA_FLAGS itself)")
    if not 0 < a.every < a.steps:
        sys.exit(f"--every must be between 1 and --steps - 1 (got {a.every})")
    corpus = load_corpus(None)
    rows = [run(d, a.steps, a.every, corpus) for d in ("dropless", "capacity")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    args = "".join(f" --{k} {v}" for k, v in (("steps", a.steps), ("every", a.every)) if v != ap.get_default(k))
    RESULTS.write_text(json.dumps({
        "command": "python experiments/bench_rebalance_train.py" + args,
        "model": model("dropless").to_dict(), "steps": a.steps, "every": a.every, "redundant": REDUNDANT,
        "device": f"{jax.device_count()} simulated cpu devices", "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
