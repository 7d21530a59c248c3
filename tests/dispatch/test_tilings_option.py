"""The dropless `tilings` option: a tuned tile table reaches the Pallas layer from a file."""

import jax
import numpy as np
import pytest

import jmoe
from jmoe.dispatch.pallas import TilingTable, tiling_for


def test_a_tilings_file_reaches_the_layer(tmp_path):
    table = TilingTable().with_tiling("gpu", 64, 8, 16, 4, "float32", (16, 16, 16))
    path = tmp_path / "tilings.json"
    table.save(path)
    assert tiling_for("gpu", 64, 8, 16, 4, "float32", TilingTable.load(path)) == (16, 16, 16)
    base = jmoe.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16)
    cfg = base.replace(dispatch_options=dict(impl="pallas", tilings=str(path)))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (24, 8))
    y, _ = jmoe.moe_layer(params, x, cfg)
    ref, _ = jmoe.moe_layer(params, x, base.replace(dispatch="dense"))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("{nope", "is not a tiling table")])
def test_a_bad_tilings_file_is_named(tmp_path, content, message):
    path = tmp_path / "tilings.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"tilings file .*tilings.json {message}"):
        jmoe.MoEConfig(dispatch_options=dict(tilings=str(path)))
