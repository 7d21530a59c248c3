import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import MoEConfig
from jmoe.nn import LMConfig, TransformerLM, init_lm, lm_apply, preset
from jmoe.nn.attention import apply_rope, attention_block_size, blockwise_causal_attention
from tests.util import jit_lm_apply

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8, dispatch_options=dict(block_size=8))
CFG = LMConfig(d_model=16, n_layers=3, n_heads=2, d_ff=16, max_seq_len=16, moe=MOE, moe_every=2)


def test_shapes_and_layer_kinds():
    params = init_lm(jax.random.key(0), CFG)
    assert "ffn" in params["layers"]["0"] and "moe" in params["layers"]["1"] and "ffn" in params["layers"]["2"]
    assert CFG.moe_layers == [1]
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
    logits, aux = jit_lm_apply(params, tokens, CFG)
    assert logits.shape == (2, 9, 256) and logits.dtype == jnp.float32
    assert len(aux.moe) == 1 and aux.load().shape == (1, 4)
    assert float(aux.moe_loss) > 0


def test_causal():
    params = init_lm(jax.random.key(0), CFG.replace(moe=MOE.replace(dispatch="dense")))
    cfg = CFG.replace(moe=MOE.replace(dispatch="dense"))
    a = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
    b = a.at[0, 6:].set(7)
    la, _ = jit_lm_apply(params, a, cfg)
    lb, _ = jit_lm_apply(params, b, cfg)
    np.testing.assert_allclose(la[0, :6], lb[0, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[0, 6:], lb[0, 6:])


def test_rope_is_relative():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    def score(pq, pk):
        return jnp.sum(apply_rope(q, jnp.array([[pq]]), 1e4) * apply_rope(k, jnp.array([[pk]]), 1e4))
    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)


def test_dense_variant_and_param_counts():
    dense = CFG.replace(moe=None)
    params = init_lm(jax.random.key(0), dense)
    assert all("ffn" in l for l in params["layers"].values())
    logits, aux = jit_lm_apply(params, jnp.zeros((1, 4), jnp.int32), dense)
    assert aux.moe == () and float(aux.moe_loss) == 0.0
    # tiny preset: dense baseline and MoE have equal active parameters, but for the routers
    tiny = preset("tiny")["model"]
    routers = len(tiny.moe_layers) * tiny.d_model * tiny.moe.num_experts
    assert tiny.num_params(active=True) == tiny.replace(moe=None).num_params() + routers
    assert tiny.num_params() > tiny.num_params(active=True)


def test_gradients_finite_and_nnx_wrapper_matches():
    model = TransformerLM(CFG, rngs=nnx.Rngs(params=0))
    params = init_lm(jax.random.key(0), CFG)
    pure = nnx.split(model)[1].to_pure_dict()
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    np.testing.assert_allclose(model(tokens)[0], lm_apply(pure, tokens, CFG)[0], rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda p: lm_apply(p, tokens, CFG)[0].mean() + lm_apply(p, tokens, CFG)[1].moe_loss))(params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))


def test_config_validation():
    with pytest.raises(ValueError, match="moe.d_model"):
        LMConfig(d_model=32, moe=MOE)
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert LMConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="tokens"):
        lm_apply(init_lm(jax.random.key(0), CFG), jnp.zeros((4,), jnp.int32), CFG)


def _dense_causal_attention(q, k, v, scale):
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    S = q.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((S, S), bool)), logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("S,H,Hkv,Dk,Dv,block", [
    (37, 4, 2, 8, 8, 8),     # ragged last block, grouped-query attention
    (32, 3, 3, 8, 5, 16),    # value width differs from the key width (MLA)
    (12, 2, 1, 4, 4, 64),    # one block larger than the sequence
    (40, 4, 4, 8, 8, None),  # the default block size
])
def test_blockwise_attention_matches_dense(S, H, Hkv, Dk, Dv, block):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, S, H, Dk))
    k = jax.random.normal(ks[1], (2, S, Hkv, Dk))
    v = jax.random.normal(ks[2], (2, S, Hkv, Dv))
    fast = lambda q, k, v: blockwise_causal_attention(q, k, v, 0.3, block)
    ref = lambda q, k, v: _dense_causal_attention(q, k, v, 0.3)
    np.testing.assert_allclose(jax.jit(fast)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))
    for g_fast, g_ref in zip(loss(fast)(q, k, v), loss(ref)(q, k, v)):
        np.testing.assert_allclose(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_blockwise_attention_block_size_and_shape_errors():
    assert attention_block_size(512) == 64 and attention_block_size(2048) == 64
    assert attention_block_size(4096) == 128 and -(-4096 // attention_block_size(4096)) <= 32
    q = jnp.zeros((1, 8, 3, 4))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        blockwise_causal_attention(q, jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)), 1.0)
