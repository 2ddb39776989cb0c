"""Clipped SGD with weight decay, NT-ASGD averaging and its switch rule, by hand."""

import jax.numpy as jnp
import numpy as np

from mos_jax import optim


def test_update_rule_by_hand():
    p = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([0.5])}
    g = {"w": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([4.0])}  # global norm 5
    tx = optim.sgd_transform(clip=0.25, weight_decay=0.1)
    updates, _ = tx.update(g, tx.init(p), p)
    new = optim.apply_updates(p, updates, lr=2.0)
    # p - lr * (g * 0.25 / 5 + 0.1 * p): decay is added after clipping.
    np.testing.assert_allclose(new["w"], [1 - 2 * (0.15 + 0.1), -2 - 2 * (0 - 0.2)], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5 - 2 * (0.2 + 0.05)], rtol=1e-6)
    small = {"w": jnp.asarray([0.1, 0.0]), "b": jnp.asarray([0.0])}  # under the clip
    updates, _ = tx.update(small, tx.init(p), p)
    np.testing.assert_allclose(optim.apply_updates(p, updates, 1.0)["w"],
                               [1 - 0.1 - 0.1, -2 + 0.2], rtol=1e-6)


def test_should_switch_by_hand():
    assert not optim.should_switch([5, 4, 3, 2, 1], 9.0, nonmono=5)  # only 5 logged
    assert not optim.should_switch([5, 4, 3, 2, 1, 1.5], 4.5, nonmono=5)  # 4.5 < min([5])
    assert optim.should_switch([5, 4, 3, 2, 1, 1.5], 5.5, nonmono=5)
    assert optim.should_switch([3, 1, 2, 2, 2, 2, 2], 2.5, nonmono=5)  # > min([3, 1])
    assert not optim.should_switch([3, 1, 2], 0.5, nonmono=1)
    assert optim.should_switch([3, 1, 2], 1.5, nonmono=1)  # > min([3, 1])


def test_averaging_is_the_mean_of_iterates_since_the_switch():
    iterates = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.0, 5.0]),
                np.array([2.0, 2.0])]
    state = optim.averaging_init({"x": jnp.zeros(2)})
    state = optim.averaging_update(state, {"x": jnp.asarray(iterates[0])})
    assert int(state.count) == 0  # inactive: nothing averaged
    assert optim.eval_params(state, {"x": 7}) == {"x": 7}
    state = optim.switch_on(state)
    for it in iterates[1:]:
        state = optim.averaging_update(state, {"x": jnp.asarray(it)})
    assert int(state.count) == 3
    np.testing.assert_allclose(state.average["x"], np.mean(iterates[1:], axis=0), rtol=1e-6)
    assert optim.eval_params(state, {"x": 7}) is state.average
