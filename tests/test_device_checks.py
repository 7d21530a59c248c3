"""The accelerator checks' runner and the MFU count, checked without an accelerator."""

import subprocess
import sys
from pathlib import Path

import jmoe
from jmoe.nn import LMConfig

ROOT = Path(__file__).parents[1]


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "experiments/device_checks.sh"), "kernels", "nope"],
                         env={"PATH": "/usr/bin:/bin", "DEST": str(tmp_path / "dest"), "PYTHON": "/nonexistent"},
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["device_checks.sh: unknown part 'nope' (known: kernels mfu decode offload quant)"]
    assert out.stdout == "" and not (tmp_path / "dest").exists()


def test_model_flops_count_what_a_token_uses():
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_train_mfu import model_flops_per_token

    d, L, H, f, E, k, V, S = 64, 3, 4, 32, 8, 2, 256, 128
    cfg = LMConfig(d_model=d, n_layers=L, n_heads=H, d_ff=4 * d, max_seq_len=S, vocab_size=V,
                   moe=jmoe.MoEConfig(num_experts=E, top_k=k, d_model=d, d_ff=f))
    per_layer = 4 * d * d + d * E + k * 3 * d * f + 2 * d  # attention, router, k experts, two norms
    used = L * per_layer + d + d * V  # the final norm, the output projection (the embedding is a lookup)
    attention = 6 * L * S * d  # causal: half of 6 x 2 x L x S x H x Dh
    assert model_flops_per_token(cfg, S) == 6 * used + attention
