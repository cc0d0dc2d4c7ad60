"""Each code-level optimization of pgscope.optimizations on its own, against hand-computed
numbers (docs/design.md section 1.5)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd as GymRunningMeanStd
from torch import nn

from pgscope.networks import GaussianPolicy, ValueNet
from pgscope.optimizations import (
    ObsNormalizer,
    RewardScaler,
    RunningMeanStd,
    activation,
    adapt_kl_beta,
    annealed_lr,
    clip_actions,
    clip_gradients,
    clip_observations,
    clip_rewards,
    entropy_bonus,
    init_network,
    kl_early_stop,
    normalize_advantages,
    value_loss,
)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# 1. value-function clipping ------------------------------------------------------------
# Four elements, clip range 0.2:
#   0: V=1.0,  V_old=0.5, R=2.0:  V-V_old=0.5 -> clipped V=0.7;  (1-2)^2=1,   (0.7-2)^2=1.69
#   1: V=2.0,  V_old=1.0, R=0.0:  V-V_old=1.0 -> clipped V=1.2;  (2-0)^2=4,   (1.2-0)^2=1.44
#   2: V=0.55, V_old=0.5, R=1.0:  inside the range -> both 0.45^2=0.2025
#   3: V=-1.0, V_old=0.0, R=-3.0: V-V_old=-1 -> clipped V=-0.2;  (-1+3)^2=4, (-0.2+3)^2=7.84
VALUES = [1.0, 2.0, 0.55, -1.0]
OLD_VALUES = [0.5, 1.0, 0.5, 0.0]
TARGETS = [2.0, 0.0, 1.0, -3.0]


def test_value_loss_unclipped_is_mean_squared_error():
    loss = value_loss(_t(VALUES), _t(OLD_VALUES), _t(TARGETS), None)
    assert loss.item() == pytest.approx((1.0 + 4.0 + 0.2025 + 4.0) / 4, rel=1e-12)
    v, r = np.array(VALUES), np.array(TARGETS)
    assert loss.item() == pytest.approx(np.mean((v - r) ** 2), rel=1e-12)


def test_value_loss_clipped_takes_elementwise_max():
    values = _t(VALUES).requires_grad_(True)
    loss = value_loss(values, _t(OLD_VALUES), _t(TARGETS), 0.2)
    # max(1, 1.69), max(4, 1.44), max(.2025, .2025), max(4, 7.84)
    assert loss.item() == pytest.approx((1.69 + 4.0 + 0.2025 + 7.84) / 4, rel=1e-12)
    v, vo, r = np.array(VALUES), np.array(OLD_VALUES), np.array(TARGETS)
    clipped = vo + np.clip(v - vo, -0.2, 0.2)
    expected = np.mean(np.maximum((v - r) ** 2, (clipped - r) ** 2))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Where the clipped term wins (elements 0 and 3) V is clamped: no gradient flows.
    loss.backward()
    expected_grad = [0.0, 2 * (2.0 - 0.0) / 4, 2 * (0.55 - 1.0) / 4, 0.0]
    np.testing.assert_allclose(values.grad.numpy(), expected_grad, rtol=1e-12, atol=1e-15)


def test_value_loss_clipped_never_below_unclipped():
    gen = torch.Generator().manual_seed(0)
    v, vo, r = (torch.randn(100, generator=gen, dtype=torch.float64) for _ in range(3))
    assert value_loss(v, vo, r, 0.2) >= value_loss(v, vo, r, None)
    # A huge clip range never binds: identical to the plain MSE.
    assert value_loss(v, vo, r, 1e9).item() == pytest.approx(value_loss(v, vo, r, None).item(),
                                                             rel=1e-12)


# 2. reward scaling ---------------------------------------------------------------------
def _reference_reward_scaling(rewards: np.ndarray, dones: np.ndarray, gamma: float,
                              eps: float = 1e-8, prior: float = 1e-4) -> np.ndarray:
    """Straightforward re-computation: discounted return per env (reset after done), the
    variance of every return seen so far pooled with RunningMeanStd's prior (mean 0, var 1,
    weight ``prior``), rewards divided by sqrt(var + eps)."""
    ret = np.zeros(rewards.shape[1])
    seen: list[float] = []
    out = np.zeros_like(rewards)
    for t in range(rewards.shape[0]):
        ret = gamma * ret + rewards[t]
        seen.extend(ret.tolist())
        x = np.array(seen)
        n = len(x)
        mean = x.sum() / (n + prior)
        var = (prior * (1.0 + mean**2) + np.sum((x - mean) ** 2)) / (n + prior)
        out[t] = rewards[t] / np.sqrt(var + eps)
        ret = np.where(dones[t], 0.0, ret)
    return out


def test_reward_scaler_matches_numpy_recomputation_two_envs():
    gamma = 0.9
    rewards = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0], [-1.0, 0.0], [4.0, 2.5],
                        [1.5, -0.5]])
    dones = np.array([[False, False], [False, True], [True, False], [False, False],
                      [False, True], [False, False]])
    scaler = RewardScaler(num_envs=2, gamma=gamma)
    got = np.stack([scaler(rewards[t], dones[t]) for t in range(len(rewards))])
    np.testing.assert_allclose(got, _reference_reward_scaling(rewards, dones, gamma),
                               rtol=1e-10)
    # First step by hand: returns [1, -2] pooled with the prior -> var ~ 2.25 (mean ~ -0.5).
    var1 = (1e-4 * (1 + 0.25) + 1.5**2 + 1.5**2) / (2 + 1e-4)  # mean ~ -0.5 (prior ignored)
    assert got[0, 0] == pytest.approx(1.0 / math.sqrt(var1), rel=1e-4)


def test_reward_scaler_has_no_mean_shift_and_keeps_sign():
    scaler = RewardScaler(num_envs=2, gamma=0.99)
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = rng.normal(5.0, 1.0, size=2)  # all positive, large mean
        scaled = scaler(r, np.array([False, False]))
        # One common divisor for both envs and no subtraction: the ratio is constant.
        assert scaled[0] / r[0] == pytest.approx(scaled[1] / r[1], rel=1e-12)
        assert np.all(scaled > 0)
    zero = scaler(np.zeros(2), np.array([False, False]))
    np.testing.assert_array_equal(zero, [0.0, 0.0])


def test_reward_scaler_resets_return_on_done():
    scaler = RewardScaler(num_envs=2, gamma=0.5)
    scaler(np.array([2.0, 2.0]), np.array([False, False]))
    np.testing.assert_allclose(scaler.ret, [2.0, 2.0])
    scaler(np.array([1.0, 1.0]), np.array([True, False]))  # env 0 ends on this step
    np.testing.assert_allclose(scaler.ret, [0.0, 0.5 * 2.0 + 1.0])
    scaler(np.array([3.0, 3.0]), np.array([False, False]))
    np.testing.assert_allclose(scaler.ret, [3.0, 0.5 * 2.0 + 3.0])


def test_reward_scaler_state_dict_round_trip():
    a = RewardScaler(num_envs=2, gamma=0.99)
    rng = np.random.default_rng(1)
    for _ in range(10):
        a(rng.normal(size=2), rng.random(2) < 0.2)
    state, twin = a.state_dict(), copy.deepcopy(a)
    for _ in range(5):  # later calls must not leak into `state`
        a(rng.normal(size=2), np.array([True, False]))
    b = RewardScaler(num_envs=2, gamma=0.99)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.ret, twin.ret)
    r, d = np.array([0.3, -1.2]), np.array([False, True])
    np.testing.assert_array_equal(b(r, d), twin(r, d))


# 3. orthogonal init with layer scaling --------------------------------------------------
def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_orthogonal_init_gains_and_zero_biases():
    torch.manual_seed(0)
    # tall (64x11), wide (32x64) and output layers: every singular value equals the gain.
    policy = GaussianPolicy(11, 3, (64, 32), "tanh", ortho_init=True)
    value = ValueNet(11, (64, 32), "tanh", ortho_init=True)
    for net, out_gain in ((policy.net, 0.01), (value.net, 1.0)):
        layers = _linears(net)
        assert len(layers) == 3
        for i, layer in enumerate(layers):
            w = layer.weight.detach().double()
            gain = out_gain if i == len(layers) - 1 else math.sqrt(2)
            sv = torch.linalg.svdvals(w)
            np.testing.assert_allclose(sv.numpy(), gain, rtol=1e-5)
            assert torch.count_nonzero(layer.bias) == 0
    # Hidden gain sqrt(2): W^T W = 2 I for the tall first layer, W W^T = 2 I for the wide one.
    w0, w1 = (layer.weight.detach().double() for layer in _linears(policy.net)[:2])
    np.testing.assert_allclose((w0.T @ w0).numpy(), 2 * np.eye(11), atol=1e-5)
    np.testing.assert_allclose((w1 @ w1.T).numpy(), 2 * np.eye(32), atol=1e-5)
    # Value output row (1x64 -> 1x32): norm 1.0; policy output rows: orthonormal * 0.01.
    w_out = _linears(policy.net)[-1].weight.detach().double()
    np.testing.assert_allclose((w_out @ w_out.T).numpy(), 1e-4 * np.eye(3), atol=1e-9)
    assert _linears(value.net)[-1].weight.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_init_network_last_layer_gain_is_the_argument():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))
    init_network(net, orthogonal=True, output_gain=0.37)
    np.testing.assert_allclose(torch.linalg.svdvals(net[2].weight.detach()).numpy(), 0.37,
                               rtol=1e-5)


def test_xavier_init_bounds_when_not_orthogonal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(11, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 3))
    for m in net:  # make biases non-zero to see them zeroed
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0.5)
    init_network(net, orthogonal=False, output_gain=0.01)
    for layer in _linears(net):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max().item() <= bound
        # Uniform on [-bound, bound]: the extremes are reached nearly, the spread is
        # bound/sqrt(3), and the output gain does not apply.
        assert w.abs().max().item() > 0.9 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
        assert torch.count_nonzero(layer.bias) == 0
    # Not orthogonal: singular values of the square layer are spread out.
    sv = torch.linalg.svdvals(net[2].weight.detach())
    assert sv.max() / sv.min() > 5


# 4. learning-rate annealing --------------------------------------------------------------
def test_annealed_lr_linear_to_zero():
    base, n = 3e-4, 10
    lrs = [annealed_lr(base, i, n, anneal=True) for i in range(n)]
    assert lrs[0] == base
    assert lrs[-1] == pytest.approx(base / n, rel=1e-12)
    assert lrs[5] == pytest.approx(base / 2, rel=1e-12)
    np.testing.assert_allclose(np.diff(lrs), -base / n, rtol=1e-9)
    assert annealed_lr(base, n, n, anneal=True) == 0.0  # would reach 0 one step after the last


def test_annealed_lr_unchanged_without_anneal():
    assert all(annealed_lr(2.5e-4, i, 7, anneal=False) == 2.5e-4 for i in range(7))


# 5. / 7. reward and observation clipping -------------------------------------------------
def test_clip_rewards_bounds_and_none():
    r = np.array([-20.0, -10.0, 0.5, 10.0, 11.0])
    np.testing.assert_array_equal(clip_rewards(r, 10.0), [-10.0, -10.0, 0.5, 10.0, 10.0])
    np.testing.assert_array_equal(clip_rewards(r, 1.0), [-1.0, -1.0, 0.5, 1.0, 1.0])
    assert clip_rewards(r, None) is r


def test_clip_observations_bounds_and_none():
    obs = np.array([[-12.0, 3.0], [9.99, 10.5]])
    np.testing.assert_array_equal(clip_observations(obs, 10.0), [[-10.0, 3.0], [9.99, 10.0]])
    assert clip_observations(obs, None) is obs


# 6. running statistics and observation normalization -------------------------------------
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("shape", [(), (3,)])
def test_running_mean_std_matches_gymnasium(batch_size, shape):
    rng = np.random.default_rng(42)
    ours, ref = RunningMeanStd(shape=shape), GymRunningMeanStd(shape=shape)
    batches = [rng.normal(2.0, 3.0, size=(batch_size, *shape)) for _ in range(30)]
    for x in batches:
        ours.update(x)
        ref.update(x)
        np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-10, atol=0)
        np.testing.assert_allclose(ours.var, ref.var, rtol=1e-10, atol=0)
        assert ours.count == pytest.approx(ref.count, rel=1e-12)
    data = np.concatenate(batches, axis=0)
    # The 1e-4 prior count shifts the statistics only at the ~1e-6 relative level...
    np.testing.assert_allclose(ours.mean, data.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ours.var, data.var(axis=0), rtol=1e-5)
    # ... and without it the running statistics are exactly those of all the data.
    exact = RunningMeanStd(shape=shape, epsilon=0.0)
    for x in batches:
        exact.update(x)
    np.testing.assert_allclose(exact.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(exact.var, data.var(axis=0), rtol=1e-10)
    assert exact.count == len(data)


def test_obs_normalizer_zero_mean_unit_variance():
    rng = np.random.default_rng(3)
    data = rng.normal([5.0, -3.0, 0.0, 100.0], [0.1, 2.0, 1.0, 30.0], size=(2000, 4))
    norm = ObsNormalizer((4,))
    for chunk in np.split(data, 100):
        norm.update(chunk)
    out = norm(data)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    # The 1e-4 prior count at mean 0 pulls the variance of the 0.1-std feature (mean 5) by
    # 1e-4 * 5^2 / (2000 * 0.01) ~ 1.3e-4 relative; the others are within 1e-5.
    np.testing.assert_allclose(out.var(axis=0), 1.0, rtol=3e-4)
    np.testing.assert_allclose(out.var(axis=0)[1:], 1.0, rtol=1e-5)


def test_obs_normalizer_state_dict_round_trip():
    rng = np.random.default_rng(4)
    a = ObsNormalizer((3,))
    for _ in range(20):
        a.update(rng.normal(1.0, 2.0, size=(5, 3)))
    state = a.state_dict()
    probe = rng.normal(size=(6, 3))
    expected = a(probe)
    a.update(rng.normal(10.0, 5.0, size=(50, 3)))  # later updates must not leak into `state`
    b = ObsNormalizer((3,))
    b.load_state_dict(state)
    np.testing.assert_array_equal(b(probe), expected)
    assert b.rms.count == pytest.approx(1e-4 + 100)
    assert not np.allclose(a(probe), expected)


# 8. activation ----------------------------------------------------------------------------
def test_activation_names():
    assert activation("tanh") is nn.Tanh
    assert activation("relu") is nn.ReLU
    with pytest.raises(KeyError):
        activation("sigmoid")


# 9. gradient clipping ----------------------------------------------------------------------
def _params_with_grads(g1: list[float], g2: list[float]) -> list[nn.Parameter]:
    p1, p2 = nn.Parameter(torch.zeros(len(g1))), nn.Parameter(torch.zeros(len(g2)))
    p1.grad, p2.grad = torch.tensor(g1), torch.tensor(g2)
    return [p1, p2]


def _global_norm(params: list[nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))


def test_clip_gradients_binding():
    params = _params_with_grads([3.0, 0.0], [4.0])  # global norm 5
    assert clip_gradients(params, 1.0) == pytest.approx(5.0, rel=1e-6)
    assert _global_norm(params) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(params[0].grad.numpy(), [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(params[1].grad.numpy(), [0.8], rtol=1e-5)


def test_clip_gradients_not_binding_and_none():
    params = _params_with_grads([3.0, 0.0], [4.0])
    assert clip_gradients(params, 10.0) == pytest.approx(5.0, rel=1e-6)
    np.testing.assert_array_equal(params[0].grad.numpy(), [3.0, 0.0])
    np.testing.assert_array_equal(params[1].grad.numpy(), [4.0])
    # None: only the norm is computed; a parameter without a gradient is ignored.
    no_grad = nn.Parameter(torch.ones(2))
    assert clip_gradients([*params, no_grad], None) == pytest.approx(5.0, rel=1e-6)
    np.testing.assert_array_equal(params[1].grad.numpy(), [4.0])


def test_clip_gradients_no_grads_is_zero_either_way():
    params = [nn.Parameter(torch.ones(2))]
    assert clip_gradients(params, 0.5) == 0.0
    assert clip_gradients(params, None) == 0.0


# further switches ----------------------------------------------------------------------
def test_normalize_advantages():
    adv = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = normalize_advantages(adv, enabled=True)
    std = math.sqrt(5.0 / 3.0)  # unbiased std of 1..4
    np.testing.assert_allclose(out.numpy(), (np.array([1, 2, 3, 4]) - 2.5) / std, rtol=1e-7)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert out.std().item() == pytest.approx(1.0, rel=1e-7)
    assert normalize_advantages(adv, enabled=False) is adv
    one = torch.tensor([5.0])
    assert normalize_advantages(one, enabled=True) is one
    # Constant advantages carry no signal: normalized to exact zeros, not NaN.
    np.testing.assert_array_equal(normalize_advantages(torch.full((4,), 3.0), True).numpy(), 0.0)


def test_entropy_bonus():
    ent = torch.tensor([1.0, 2.0, 3.0])
    assert entropy_bonus(ent, 0.01).item() == pytest.approx(0.02, rel=1e-6)
    assert entropy_bonus(ent, 0.0).item() == 0.0


def test_kl_early_stop_threshold():
    assert kl_early_stop(0.0151, 0.01, enabled=True)
    assert not kl_early_stop(0.0149, 0.01, enabled=True)
    assert kl_early_stop(0.031, 0.02, enabled=True)
    assert not kl_early_stop(0.029, 0.02, enabled=True)
    assert not kl_early_stop(100.0, 0.01, enabled=False)


def test_clip_actions():
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 2.0])
    actions = np.array([[-3.0, 0.5], [0.2, 5.0]])
    np.testing.assert_array_equal(clip_actions(actions, low, high, True),
                                  [[-1.0, 0.5], [0.2, 2.0]])
    assert clip_actions(actions, low, high, False) is actions
    np.testing.assert_array_equal(actions, [[-3.0, 0.5], [0.2, 5.0]])  # input untouched


def test_adapt_kl_beta():
    target = 0.01
    assert adapt_kl_beta(1.0, 0.02, target) == 2.0  # above 1.5 * target
    assert adapt_kl_beta(1.0, 0.005, target) == 0.5  # below target / 1.5
    for kl in (0.01, 0.0149, 0.0067):  # inside [target/1.5, 1.5 target]
        assert adapt_kl_beta(1.0, kl, target) == 1.0
    assert adapt_kl_beta(0.25, 1.0, target) == 0.5
