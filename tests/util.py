"""Helpers shared by the tests."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.routing import Routing


def make_routing(key, T, E, k, *, mask_prob=0.0, expert_ids=None):
    """A random valid Routing: k distinct experts per token, random positive weights."""
    return _make_routing(key, T, E, k, mask_prob, expert_ids)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _make_routing(key, T, E, k, mask_prob, expert_ids):
    k_ids, k_w, k_m, k_l = jax.random.split(key, 4)
    if expert_ids is None:
        scores = jax.random.uniform(k_ids, (T, E))
        expert_ids = jnp.argsort(-scores, axis=-1)[:, :k].astype(jnp.int32)
    expert_ids = jnp.asarray(expert_ids, jnp.int32)
    weights = jax.random.uniform(k_w, (T, k), minval=0.1, maxval=1.0)
    mask = jax.random.uniform(k_m, (T, k)) >= mask_prob
    logits = jax.random.normal(k_l, (T, E))
    return Routing(
        expert_ids=expert_ids,
        weights=jnp.where(mask, weights, 0.0),
        probs=jax.nn.softmax(logits),
        logits=logits,
        mask=mask,
    )


def tree_allclose(a, b, rtol=1e-5, atol=1e-5):
    la, ta = jax.tree.flatten_with_path(a)
    lb, tb = jax.tree.flatten_with_path(b)
    assert ta == tb, "tree structures differ"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol,
            err_msg=f"at {jax.tree_util.keystr(path)}",
        )


@partial(jax.jit, static_argnums=1)
def init_experts(key, cfg):
    """jmoe.experts.init_experts, compiled once per config."""
    from jmoe.experts import init_experts as init

    return init(key, cfg)


def _jit_lm_apply():
    from jmoe.nn import lm_apply

    return jax.jit(lm_apply, static_argnums=2, static_argnames=("keep_moe_inputs",))


jit_lm_apply = _jit_lm_apply()
"""`jmoe.nn.lm_apply` compiled (one program per shape and config instead of op-by-op dispatch)."""


def greedy_by_full_forwards(params, cfg, prompt, steps: int) -> list[int]:
    """Greedy continuation of `prompt` by a full forward of the whole sequence per token (no
    cache): the reference cached decoding is tested against. One shape: the model is causal,
    so the padding after the sequence changes nothing."""
    import jax.numpy as jnp

    seq = list(prompt)
    for _ in range(steps):
        x = jnp.asarray([seq + [0] * (cfg.max_seq_len - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(jit_lm_apply(params, x, cfg)[0][0, len(seq) - 1])))
    return seq[len(prompt):]


def write_bpe_tokenizer(directory, texts, *, vocab_size: int = 300, eos: bool = True) -> int:
    """Train a byte-level BPE tokenizer with "<s>" (id 0, prepended by encode) and "</s>" (id 1)
    on `texts`, save it as `directory`/tokenizer.json with a tokenizer_config.json, as
    transformers does; returns its vocabulary size."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", **({"eos_token": "</s>"} if eos else {})}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()
