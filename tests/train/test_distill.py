import jax
import numpy as np

from jmoe.train.trainer import distillation_loss


def test_distillation_loss_is_temperature_scaled_kl():
    s = jax.random.normal(jax.random.key(0), (2, 3, 5))
    t = jax.random.normal(jax.random.key(1), (2, 3, 5))
    assert abs(float(distillation_loss(t, t, 2.0))) < 1e-6
    T = 2.0
    pt = np.asarray(jax.nn.softmax(t / T))
    ref = T**2 * np.mean(np.sum(pt * (np.log(pt) - np.asarray(jax.nn.log_softmax(s / T))), -1))
    np.testing.assert_allclose(float(distillation_loss(s, t, T)), ref, rtol=1e-5)
    g = jax.grad(lambda x: distillation_loss(x, t, 1.0))(s)  # pulls the student towards the teacher
    np.testing.assert_allclose(np.asarray(g), (np.asarray(jax.nn.softmax(s)) - np.asarray(jax.nn.softmax(t))) / 6,
                               rtol=1e-4, atol=1e-6)
