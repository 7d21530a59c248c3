import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmoe import MoEConfig, init_moe, moe_layer
from jmoe.nn import MoE

CFG = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, dispatch_options=dict(block_size=8), num_shared_experts=1)


def test_split_state_has_the_functional_tree_and_same_output():
    module = MoE(CFG, rngs=nnx.Rngs(params=0))
    _, state = nnx.split(module, nnx.Param, ...)[:2]
    pure = state.to_pure_dict()
    params = init_moe(jax.random.key(0), CFG)
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, pure) == jax.tree.map(jnp.shape, params)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    y_mod, aux_mod = module(x)
    y_fn, aux_fn = moe_layer(pure, x, CFG)
    np.testing.assert_allclose(y_mod, y_fn, rtol=1e-6)
    np.testing.assert_allclose(aux_mod.loss, aux_fn.loss, rtol=1e-6)


def test_loading_functional_params_into_the_module():
    module = MoE(CFG, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(module)
    params = init_moe(jax.random.key(42), CFG)
    state.replace_by_pure_dict(params)
    module2 = nnx.merge(graphdef, state)
    x = jax.random.normal(jax.random.key(1), (6, 8))
    np.testing.assert_allclose(module2(x)[0], moe_layer(params, x, CFG)[0], rtol=1e-6)


def test_jit_and_grad_through_the_module():
    module = MoE(CFG, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (6, 8))

    @nnx.jit
    def loss(m, x):
        y, aux = m(x)
        return jnp.sum(y**2) + aux.loss

    grads = nnx.grad(loss)(module, x)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(jax.tree.leaves(init_moe(jax.random.key(0), CFG)))
    assert all(np.isfinite(g).all() for g in flat)
