"""THOR (`jmoe.routing.thor`): one random expert per layer and forward pass in training, a fixed
one without a key; and the consistency regulariser it trains with (`TrainConfig.consistency_weight`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.layer import init_moe, moe_layer
from jmoe.nn import LMConfig, init_lm, lm_apply
from jmoe.train import TrainConfig, make_optimizer
from jmoe.train.trainer import init_train_state, make_train_step, symmetric_kl

THOR = MoEConfig(num_experts=4, top_k=1, d_model=16, d_ff=8, router="thor")


def test_one_random_expert_for_all_tokens_with_a_key_and_a_fixed_one_without():
    params = init_moe(jax.random.key(0), THOR)
    assert params["router"] == {}
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    drawn = set()
    for k in range(12):
        key = jax.random.key(100 + k)
        y, aux = moe_layer(params, x, THOR, key=key)
        ids = np.asarray(aux.routing.expert_ids)
        assert (ids == ids[0, 0]).all()  # the whole batch goes to one expert
        drawn.add(int(ids[0, 0]))
    assert drawn == {0, 1, 2, 3}
    y, aux = moe_layer(params, x, THOR.replace(router_options={"expert": 2}))
    assert (np.asarray(aux.routing.expert_ids) == 2).all()


@pytest.mark.parametrize("changes, message", [
    ({"top_k": 2}, "router 'thor' sends each token to one expert"),
    ({"router_options": {"expert": 4}}, "MoEConfig.thor.expert=4 is outside the layer's 4 experts"),
    ({"router_options": {"inference": "all"}}, "inference"),
])
def test_bad_thor_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        THOR.replace(**changes)


def test_symmetric_kl_is_the_reference_formula():
    p = jax.random.normal(jax.random.key(0), (2, 3, 7))
    q = jax.random.normal(jax.random.key(1), (2, 3, 7))
    sp, sq = np.asarray(jax.nn.softmax(p)), np.asarray(jax.nn.softmax(q))
    want = 0.5 * np.mean(np.sum((sp - sq) * (np.log(sp) - np.log(sq)), -1))
    np.testing.assert_allclose(float(symmetric_kl(p, q)), want, rtol=1e-5)
    assert float(symmetric_kl(p, p)) == 0.0


MODEL = LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe=THOR)


def _step(model, weight):
    tc = TrainConfig(steps=10, batch_size=4, seq_len=16, consistency_weight=weight)
    tx, sched = make_optimizer(tc)
    state = init_train_state(model, tc, tx)
    batch = jax.random.randint(jax.random.key(5), (4, 17), 0, 256)
    return make_train_step(model, tx, sched, consistency_weight=weight)(state, batch)


def test_consistency_doubles_the_gradient_of_a_deterministic_model():
    # without randomness both passes are the same: CE_1 + CE_2 + 0, twice the gradient
    model = MODEL.replace(moe=THOR.replace(router="topk", top_k=2))
    _, one = _step(model, 0.0)
    _, two = _step(model, 1.0)
    np.testing.assert_allclose(float(two["loss"]), float(one["loss"]), rtol=1e-6)  # the first pass's CE
    np.testing.assert_allclose(float(two["grad_norm"]), 2 * float(one["grad_norm"]), rtol=1e-4)


def test_thor_trains_with_the_regulariser_and_decodes_deterministically():
    state, metrics = _step(MODEL, 5.0)
    assert np.isfinite(float(metrics["loss"]))
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    a, _ = lm_apply(state["params"], tokens, MODEL)
    b, _ = lm_apply(state["params"], tokens, MODEL)
    np.testing.assert_array_equal(a, b)
    untrained = init_lm(jax.random.key(0), MODEL)
    assert jax.tree.structure(untrained) == jax.tree.structure(state["params"])


ENSEMBLE = THOR.replace(router_options={"inference": "ensemble"})


@pytest.mark.parametrize("dispatch", ["dense", "dropless", "gather", "capacity"])
def test_the_ensemble_is_the_mean_of_every_expert_forward_and_gradient(dispatch):
    cfg = ENSEMBLE.replace(dispatch=dispatch, **({"dispatch_options": {"capacity_factor": 1.0}}
                                                 if dispatch == "capacity" else {}))
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))

    def ensemble(p):
        return moe_layer(p, x, cfg)[0]

    def mean_of_each(p):
        return sum(moe_layer(p, x, THOR.replace(router_options={"expert": e}))[0] for e in range(4)) / 4

    np.testing.assert_allclose(ensemble(params), mean_of_each(params), rtol=1e-5, atol=1e-6)
    g1 = jax.grad(lambda p: jnp.sum(ensemble(p) ** 2))(params)
    g2 = jax.grad(lambda p: jnp.sum(mean_of_each(p) ** 2))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    _, aux = moe_layer(params, x, cfg, key=jax.random.key(3))  # training still draws one expert
    assert aux.routing.expert_ids.shape == (10, 1)


def test_an_ensemble_model_decodes_with_its_cache_as_full_forwards():
    from jmoe.infer import Engine
    from tests.util import greedy_by_full_forwards

    model = MODEL.replace(moe=ENSEMBLE)
    params = init_lm(jax.random.key(0), model)
    gens, _ = Engine(model, params, None, batch_size=1).generate([[1, 2, 3]], max_new_tokens=5)
    assert list(gens[0].token_ids) == greedy_by_full_forwards(params, model, [1, 2, 3], 5)
    one, _ = lm_apply(params, jnp.asarray([[1, 2, 3]], jnp.int32), MODEL)
    mean, _ = lm_apply(params, jnp.asarray([[1, 2, 3]], jnp.int32), model)
    assert not np.allclose(one, mean)


def test_the_cli_runs_a_thor_run_with_the_ensemble(tmp_path, capsys):
    import json

    from jmoe.cli import main
    from tests.train.conftest import MICRO

    run = tmp_path / "thor"
    assert main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
                 *MICRO, "--set", "moe.router=thor", "--set", "moe.top_k=1"]) == 0
    capsys.readouterr()
    losses = []
    for extra in ([], ["--router-option", "inference=ensemble"]):
        assert main(["eval", "--ckpt", str(run), "--batches", "1", "--json", *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out)["val_loss"])
    assert losses[0] != losses[1]
    assert main(["generate", "--ckpt", str(run), "--prompt", "ab", "--max-new-tokens", "3", "--router-option",
                 "inference=ensemble", "--router-option", "expert=1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--router-option", "inference=all"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--router-option: MoEConfig.thor.inference" in err and len(err.splitlines()) == 1
