"""Options owned by their methods: typed fields, nesting in MoEConfig, `--set`, old layouts."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.config import migrate_moe_dict
from jmoe.options import Options, option

DATA = Path(__file__).parent / "data" / "run_v0"


def test_each_method_owns_its_options():
    cfg = MoEConfig()
    assert type(cfg.router_options).__name__ == "TopKOptions"
    assert type(cfg.dispatch_options).__name__ == "DroplessOptions"
    assert cfg.balance_options.to_dict() == {}
    ds = cfg.replace(router="sigmoid_bias")
    assert ds.router_options.renormalize is True  # the router's own default, no None
    assert cfg.router_options.renormalize is False
    # a method change resets its options; a dict updates those of the same method
    cap = cfg.replace(dispatch="capacity", dispatch_options={"capacity_factor": 2.0})
    assert cap.dispatch_options.capacity_factor == 2.0
    assert cap.replace(dispatch="dropless").dispatch_options.block_size == 512
    ds2 = ds.replace(router_options={"route_scale": 2.5}).replace(router_options={"expert_groups": 4, "topk_groups": 2})
    assert (ds2.router_options.route_scale, ds2.router_options.expert_groups) == (2.5, 4)
    assert ds2.with_options("sigmoid_bias", route_scale=1.5).router_options.route_scale == 1.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(router="sigmoid_bias", router_options={"route_scale": "big"}), r"MoEConfig.sigmoid_bias.route_scale='big' must be a number"),
        (dict(dispatch="capacity", dispatch_options={"capacity_factor": float("nan")}), r"capacity_factor=nan must be a finite number"),
        (dict(router_options={"renormalize": "maybe"}), r"MoEConfig.topk.renormalize='maybe' must be true or false"),
        (dict(router_options={"top_p": 0.5}), r"MoEConfig.topk has no option\(s\) top_p; known: renormalize, softmax_after_topk"),
        (dict(router="top_p", router_options={"threshold": 1.5}), r"MoEConfig.top_p.threshold=1.5 must be a number > 0.0 and <= 1.0"),
        (dict(num_experts=8.0), r"MoEConfig.num_experts=8.0 must be an integer"),
        (dict(shared_gate="yes"), r"shared_gate='yes' must be true or false"),
        (dict(balance_scope="batch"), r"balance_scope='batch' must be one of global, micro, sequence"),
        (dict(balance_loss="device", balance_options={"devices": 3}), r"MoEConfig.device.devices=3 must divide the 8 router choices"),
        (dict(router="sigmoid_bias", router_options={"expert_groups": 3}), r"expert_groups=3 must divide num_experts=8"),
        (dict(router="topk", router_options=jmoe.dispatch.capacity.CapacityOptions()),
         r"MoEConfig.router_options is a CapacityOptions, but router 'topk' takes TopKOptions"),
    ],
)
def test_bad_options_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_old_flat_names_point_to_their_owner():
    with pytest.raises(ValueError, match=r"capacity_factor is an option of dispatch 'capacity'"):
        MoEConfig().replace(capacity_factor=2.0)


def test_dict_round_trip_with_options():
    cfg = MoEConfig(router="moepp", router_options=dict(num_zero_experts=1, gating_residual=True), dispatch="capacity",
                    dispatch_options=dict(capacity_factor=1.5), balance_loss="device", balance_options=dict(devices=3),
                    num_experts=8, top_k=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["router_options"]["num_zero_experts"] == 1 and d["balance_options"] == {"devices": 3}
    assert MoEConfig.from_dict(d) == cfg
    assert "balance_options" not in MoEConfig().to_dict()  # methods without options write none


def test_migration_of_the_flat_layout():
    flat = {"num_experts": 8, "top_k": 2, "router": "top_p", "dispatch": "capacity", "impl": "xla", "block_size": 64,
            "capacity_factor": 1.5, "top_p": 0.3, "renormalize": None, "route_scale": 1.0, "balance_loss": "device",
            "balance_devices": 2, "recurrent_dim": 128}
    d = migrate_moe_dict(flat)
    assert d["router_options"] == {"threshold": 0.3}  # renamed; renormalize None = the default, dropped
    assert d["dispatch_options"] == {"capacity_factor": 1.5}  # impl/block_size were never read by capacity
    assert d["balance_options"] == {"devices": 2}
    assert not set(d) & {"impl", "block_size", "top_p", "route_scale", "recurrent_dim"}
    cfg = MoEConfig.from_dict(flat)
    assert cfg.router_options.threshold == 0.3 and cfg.dispatch_options.capacity_factor == 1.5
    assert MoEConfig.from_dict({"router": "sigmoid_bias", "renormalize": None}).router_options.renormalize is True
    assert MoEConfig.from_dict({"router": "sigmoid_bias", "renormalize": False}).router_options.renormalize is False


def test_a_run_of_the_flat_layout_loads_and_evaluates_the_same(tmp_path):
    """tests/data/run_v0: a two-step sigmoid_bias + capacity run written in the flat layout.

    Evaluated in a fresh process: the run holds the default PRNG's key, and this test process
    uses another PRNG implementation (tests/conftest.py)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(DATA, run)
    saved = json.loads((run / "config.json").read_text())
    assert "route_scale" in saved["model"]["moe"] and "ep_capacity_factor" in saved["train"]
    proc = subprocess.run([sys.executable, "-m", "jmoe.cli", "eval", "--ckpt", str(run), "--batches", "2",
                           "--data", str(DATA / "eval_text.txt"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = json.loads((DATA / "expected_eval.json").read_text())
    assert got["step"] == expected["step"]
    np.testing.assert_allclose(got["val_loss"], expected["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(got["load"], expected["load"], rtol=1e-6)
    from jmoe.nn import LMConfig

    moe = LMConfig.from_dict(saved["model"]).moe
    assert moe.router_options.route_scale == 2.0 and moe.router_options.expert_groups == 2
    assert moe.router_options.bias_update_rate == 0.01 and moe.dispatch_options.capacity_factor == 1.5


# ------------------------------------------- a router from outside the package, one registration


@dataclasses.dataclass(frozen=True)
class ScaledOptions(Options):
    """temperature: logits are divided by it before the softmax."""

    temperature: float = option(1.0, gt=0.0)


def scaled_route(params, x, cfg, *, state=None, key=None, carry=None):
    from jmoe.routing.topk import router_logits

    logits = router_logits(params, x, cfg, key) / cfg.router_options.temperature
    probs = jax.nn.softmax(logits, axis=-1)
    w, ids = jax.lax.top_k(probs, cfg.top_k)
    return jmoe.Routing(expert_ids=ids.astype(jnp.int32), weights=w, probs=probs, logits=logits,
                        mask=jnp.ones(ids.shape, bool))


@pytest.fixture
def scaled_router():
    from jmoe.registry import ROUTERS
    from jmoe.routing import Router
    from jmoe.routing.topk import init_linear_router

    ROUTERS.add("scaled_softmax", Router(init=init_linear_router, apply=scaled_route), options=ScaledOptions)
    yield "scaled_softmax"
    ROUTERS.remove("scaled_softmax")


def test_a_router_registered_from_outside(scaled_router, tmp_path):
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, router=scaled_router, router_options={"temperature": 0.5})
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    _, aux = jmoe.moe_layer(params, x, cfg)
    ref = jax.nn.softmax(2.0 * x @ params["router"]["w"], axis=-1)
    np.testing.assert_allclose(aux.routing.probs, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature=0.0 must be a number > 0.0"):
        cfg.with_options(scaled_router, temperature=0.0)

    from jmoe.cli import main
    from tests.train.conftest import MICRO

    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
               *MICRO, "--router", scaled_router, "--set", f"moe.{scaled_router}.temperature=2.0"])
    assert rc == 0
    saved = json.loads((run / "config.json").read_text())["model"]["moe"]
    assert saved["router"] == scaled_router and saved["router_options"] == {"temperature": 2.0}


@pytest.mark.parametrize(
    "sets, message",
    [
        (["moe.capacity.capacity_factor=2"], r"--set moe.capacity.\*: 'capacity' is not a method this layer selects"),
        (["moe.dropless.block_size=big"], r"MoEConfig.dropless.block_size='big' must be an integer"),
        (["moe.topk.nope=1"], r"MoEConfig.topk has no option\(s\) nope"),
        (["moe.capacity_factor=2"], r"capacity_factor is an option of dispatch 'capacity'"),
        (["moe.a.b.c=1"], r"must look like"),
    ],
)
def test_set_of_options_checks_before_any_work(sets, message, tmp_path):
    from jmoe.cli import _build_train_configs, build_parser

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--preset", "tiny",
                                      *[x for s in sets for x in ("--set", s)]])
    with pytest.raises(ValueError, match=message):
        _build_train_configs(args)
    assert not (tmp_path / "r").exists()


def test_set_chooses_a_method_then_its_options(tmp_path):
    import argparse

    from jmoe.cli import _build_train_configs, build_parser

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--preset", "tiny", "--dispatch", "capacity",
                                      "--capacity-factor", "3.0", "--set", "moe.router=sigmoid_bias",
                                      "--set", "moe.sigmoid_bias.route_scale=2.5"])
    model, _, _ = _build_train_configs(args)
    assert model.moe.router_options.route_scale == 2.5 and model.moe.dispatch_options.capacity_factor == 3.0
    with pytest.raises(ValueError, match=r"--capacity-factor moe.capacity.\*"):
        _build_train_configs(argparse.Namespace(**{**vars(args), "dispatch": None}))
