import jax.numpy as jnp
import pytest

import jmoe
from jmoe import MoEConfig


def test_defaults_are_valid_and_canonical():
    cfg = MoEConfig(dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert cfg.param_dtype == "float32"
    assert cfg.router in jmoe.ROUTERS and cfg.dispatch in jmoe.DISPATCHERS


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(d_model=-1), "d_model"),
        (dict(d_ff=2.5), "d_ff"),
        (dict(router="nope"), "router"),
        (dict(dispatch="nope"), "dispatch"),
        (dict(activation="relu6"), "activation"),
        (dict(dispatch_options=dict(impl="cuda")), "impl"),
        (dict(dispatch="capacity", dispatch_options=dict(capacity_factor=0.0)), "capacity_factor"),
        (dict(router_jitter=1.5), "router_jitter"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(dtype="int32"), "dtype"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(dispatch_options=dict(block_size=0)), "block_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*topk"):
        MoEConfig(router="top-k")


def test_replace_validates_and_rejects_unknown_fields():
    cfg = MoEConfig(num_experts=8, top_k=2)
    assert cfg.replace(top_k=4).top_k == 4
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=9)
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(topk=2)


def test_dict_round_trip():
    cfg = MoEConfig(num_experts=16, top_k=4, num_shared_experts=2, d_ff_shared=64, dtype="bfloat16")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.shared_d_ff == 128


def test_fine_grained_keeps_parameters_and_flops():
    from jmoe import fine_grained

    base = MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=256)
    for m, shared in [(1, 0), (2, 1), (4, 1)]:
        c = fine_grained(base, m, shared)
        routed_params = c.num_experts * c.d_ff + c.shared_d_ff
        active = c.top_k * c.d_ff + c.shared_d_ff
        assert routed_params == base.num_experts * base.d_ff
        assert active == base.top_k * base.d_ff
    assert fine_grained(base, 4, 1) == base.replace(num_experts=31, top_k=7, d_ff=64, num_shared_experts=1, d_ff_shared=64)
    with pytest.raises(ValueError, match="m=3"):
        fine_grained(base, 3)
