"""Generation from the tiny random models of every Hugging Face architecture: cached logits
equal the full forward's at every step (batched, different prompt lengths), and greedy
generation equals transformers' `generate(do_sample=False)` token for token."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from jmoe.infer import Engine  # noqa: E402
from jmoe.io import hf  # noqa: E402
from jmoe.nn.transformer import lm_state_from_params  # noqa: E402
from tests.infer.test_engine import cached_greedy  # noqa: E402
from tests.io.test_hf import CONFIGS, build  # noqa: E402
from tests.util import jit_lm_apply  # noqa: E402

PROMPTS = [[5, 9, 13, 2, 60, 7, 1, 33, 12], [40, 3], [11, 22, 33, 44, 55]]
NEW = 8


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_cached_generation_matches_full_forward_and_transformers(arch, tmp_path):
    model, path = build(arch, tmp_path)
    cfg, params = hf.load(path)
    state = lm_state_from_params(cfg, params)

    toks, logits = cached_greedy(cfg, params, state, PROMPTS, NEW - 1, max_len=32)
    seqs = [p + list(toks[r, : NEW - 1]) for r, p in enumerate(PROMPTS)]
    width = max(map(len, seqs))
    full, _ = jit_lm_apply(
        params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32), cfg, state=state)
    for r, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits[r], np.asarray(full[r, len(p) - 1: len(p) - 1 + NEW]), rtol=2e-4, atol=2e-4,
                                   err_msg=f"{arch}, prompt {r}")

    gens, _ = Engine(cfg, params, state).generate(PROMPTS, max_new_tokens=NEW)
    model.generation_config.eos_token_id = None
    for r, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert list(gens[r].token_ids) == want[0, len(p):].tolist(), f"{arch}, prompt {r}"
        assert list(gens[r].token_ids) == list(toks[r])
