"""The dry-run plan predicts the shardings a real run on 8 (simulated) devices uses."""

import math

import jax
import numpy as np
import pytest

from jmoe.nn import preset
from jmoe.parallel.plan import plan_run
from jmoe.parallel.rules import path_str
from jmoe.train import TrainConfig
from jmoe.train.trainer import Placement, abstract_train_state


@pytest.mark.parametrize("mesh", ["data=2,expert=4", "data=2,fsdp=2,expert=2", "expert=4,model=2"])
def test_plan_matches_the_shardings_of_a_real_mesh(mesh):
    p = preset("tiny")
    tc = TrainConfig(**p["train"]).replace(mesh=mesh)
    abstract = abstract_train_state(p["model"], tc)
    plan = plan_run(p["model"], tc, mesh, hosts=2, devices_per_host=4, state=abstract)
    real = Placement(mesh, tc).shardings(abstract)
    local = {path_str(kp): s.shard_shape(a.shape)
             for (kp, a), s in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(real)) if a.shape}
    assert len(plan.leaves) == len(local)
    for path, shape, spec, per_device, _ in plan.leaves:
        assert tuple(per_device) == tuple(local[path]), path
    expert_bytes = sum(math.prod(l[3]) * 4 for l in plan.leaves if l[0].startswith("params/") and "experts" in l[0])
    total_expert = sum(math.prod(l[1]) * 4 for l in plan.leaves if l[0].startswith("params/") and "experts" in l[0])
    n_expert = dict(plan.mesh).get("expert", 1) * dict(plan.mesh).get("model", 1) * dict(plan.mesh).get("fsdp", 1)
    np.testing.assert_allclose(expert_bytes * n_expert, total_expert)
