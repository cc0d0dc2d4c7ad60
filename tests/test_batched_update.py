"""The pieces of the seed-batched update (:mod:`pgscope.engine`), each against the
single-run code it stands for, seed by seed: the masked Adam's ``torch._foreach_*`` step
against ``torch.optim.Adam`` (float64, masks that leave seeds behind with their own step
counts, a stopped seed with a non-finite gradient), the per-seed gradient clipping
against ``torch.nn.utils.clip_grad_norm_``, the seed-batched networks against each seed's
own module. ``tests/test_batched.py`` checks whole
updates and runs."""

from __future__ import annotations

import copy

import pytest
import torch

from pgscope.engine.adam import MaskedAdam
from pgscope.engine.stacked import FlatParams, Stack, clip_gradients_per_seed
from pgscope.networks import CategoricalPolicy, GaussianPolicy, ValueNet

SEEDS = 3
SHAPES = [(4, 3), (3,), ()]  # a weight, a bias, a scalar: stacked [N, 4, 3], [N, 3], [N]


def _stacked(gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    return [torch.randn(SEEDS, *s, generator=gen, dtype=torch.float64) * scale
            for s in SHAPES]


def _flat(tensors: list[torch.Tensor]) -> FlatParams:
    return FlatParams({f"p{k}": t for k, t in enumerate(tensors)})


def _set_grads(flat: FlatParams, grads: list[torch.Tensor]) -> None:
    """Gradients as backward leaves them: accumulated into each ``.grad`` in place."""
    flat.zero_grad()
    for p, g in zip(flat.params.values(), grads, strict=True):
        p.grad.add_(g)


@pytest.mark.parametrize("dtype, fused, atol", [(torch.float64, False, 1e-15),
                                               (torch.float32, True, 1e-6)])
def test_masked_adam_equals_torch_adam_per_seed(dtype, fused, atol):
    """Each seed moves as its own torch Adam stepped only where its mask is set: the
    seeds' step counts (so their bias corrections) differ, the learning rate changes
    (annealing); float64 to rounding, and float32 against the fused Adam the single engine
    uses. The state converts to torch's layout (``write_to``) and back (``read_from``)."""
    gen = torch.Generator().manual_seed(0)
    flat = _flat([p.to(dtype) for p in _stacked(gen)])
    params = list(flat.params.values())
    own = [[torch.nn.Parameter(p[i].detach().clone()) for p in params] for i in range(SEEDS)]
    torch_adams = [torch.optim.Adam([{"params": own[i], "name": "value", "lr": 0.01}],
                                    eps=1e-5, fused=fused) for i in range(SEEDS)]
    adam = MaskedAdam({"value": flat}, {"value": 0.01}, eps=1e-5)
    masks = [[0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 1, 1], [1, 0, 1]]
    for step, mask in enumerate(masks):
        lr = 0.01 * (1 - step / 10)
        adam.groups["value"].lr = lr
        grads = [g.to(dtype) for g in _stacked(gen, scale=1 + step)]
        _set_grads(flat, grads)
        adam.step(torch.tensor(mask, dtype=torch.bool))
        for i in range(SEEDS):
            torch_adams[i].param_groups[0]["lr"] = lr
            if mask[i]:
                for q, g in zip(own[i], grads, strict=True):
                    q.grad = g[i].clone()
                torch_adams[i].step()
    for i in range(SEEDS):
        for k, (p, q) in enumerate(zip(params, own[i], strict=True)):
            torch.testing.assert_close(p[i].detach(), q.detach(), rtol=0, atol=atol)
            state = torch_adams[i].state[q]
            torch.testing.assert_close(adam.groups["value"].exp_avg[k][i], state["exp_avg"],
                                       rtol=0, atol=atol)
            torch.testing.assert_close(adam.groups["value"].exp_avg_sq[k][i],
                                       state["exp_avg_sq"], rtol=0, atol=atol)
        assert float(adam.groups["value"].step[i]) == sum(m[i] for m in masks)
        probe = torch.optim.Adam([{"params": [torch.nn.Parameter(q.detach().clone())
                                              for q in own[i]], "name": "value", "lr": 0.01}],
                                 eps=1e-5, fused=fused)
        adam.write_to(i, probe)
        want, got = torch_adams[i].state_dict()["state"], probe.state_dict()["state"]
        assert want.keys() == got.keys()
        for k in want:
            assert float(got[k]["step"]) == float(want[k]["step"])
            torch.testing.assert_close(got[k]["exp_avg"], want[k]["exp_avg"])
            torch.testing.assert_close(got[k]["exp_avg_sq"], want[k]["exp_avg_sq"])
    fresh = MaskedAdam({"value": _flat([torch.zeros_like(p) for p in params])},
                       {"value": 0.01}, eps=1e-5)
    for i in range(SEEDS):
        fresh.read_from(i, torch_adams[i])
    torch.testing.assert_close(fresh.groups["value"].step, adam.groups["value"].step)
    for a, b in zip(fresh.groups["value"].exp_avg_sq, adam.groups["value"].exp_avg_sq,
                    strict=True):
        torch.testing.assert_close(a, b)


def test_a_stopped_seed_keeps_parameters_and_moments_bit_for_bit():
    """A seed outside the mask keeps every value exactly, even when its gradient (a
    placeholder minibatch's) is not finite; the others step."""
    gen = torch.Generator().manual_seed(1)
    flat = _flat(_stacked(gen))
    params = list(flat.params.values())
    adam = MaskedAdam({"value": flat}, {"value": 0.01}, eps=1e-5)
    _set_grads(flat, _stacked(gen))
    adam.step()
    group = adam.groups["value"]
    before = [t.detach().clone() for t in params + group.exp_avg + group.exp_avg_sq]
    grads = _stacked(gen)
    for g in grads:
        g[1] = float("nan")
    _set_grads(flat, grads)
    adam.step(torch.tensor([True, False, True]))
    after = params + group.exp_avg + group.exp_avg_sq
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a[1], b[1])
        assert not torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])
    assert group.step.tolist() == [2, 1, 2]


@pytest.mark.parametrize("max_norm", [0.5, None])
def test_clipping_equals_clip_grad_norm_per_seed(max_norm):
    """Seeds with gradient norms below and above ``max_norm`` are each clipped (or not)
    by their own norm, as ``clip_grad_norm_`` clips a single run's network."""
    gen = torch.Generator().manual_seed(2)
    flat = _flat([torch.zeros(SEEDS, *s, dtype=torch.float64) for s in SHAPES])
    params = list(flat.params.values())
    _set_grads(flat, [g * torch.tensor([0.01, 1.0, 5.0], dtype=torch.float64).view(
        -1, *[1] * (g.dim() - 1)) * (k + 1) for k, g in enumerate(_stacked(gen))])
    own = [[torch.nn.Parameter(p[i].clone()) for p in params] for i in range(SEEDS)]
    for i in range(SEEDS):
        for q, p in zip(own[i], params, strict=True):
            q.grad = p.grad[i].clone()
    norms = clip_gradients_per_seed(flat, max_norm)
    for i in range(SEEDS):
        want = torch.nn.utils.clip_grad_norm_(own[i], max_norm if max_norm else float("inf"))
        torch.testing.assert_close(norms[i], want, rtol=0, atol=1e-14)
        for p, q in zip(params, own[i], strict=True):
            torch.testing.assert_close(p.grad[i], q.grad, rtol=0, atol=1e-15)
    if max_norm is not None:
        assert norms[0] < max_norm < norms[2]  # one seed unclipped, one clipped


def _nets(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gaussian":
        policy = GaussianPolicy(5, 2, (8, 8), "tanh", ortho_init=True)
        with torch.no_grad():  # each seed its own std, so a shared one would show
            policy.log_std.copy_(torch.tensor([-0.5, 0.3]) * (seed + 1))
        return policy
    if kind == "categorical":
        return CategoricalPolicy(5, 4, (8,), "relu", ortho_init=False)
    return ValueNet(5, (8, 8), "tanh", ortho_init=True)


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "value"])
def test_seed_batched_network_equals_each_seeds_own(kind):
    """``Stack.batched`` runs every seed's network at once: row i of each method's
    output is seed i's own module on its own inputs (distribution parameters,
    log-probabilities, entropies, KLs to another parameter set, values, features), and
    each seed's gradient reaches only its own row of the stacked parameters."""
    nets = [_nets(kind, s) for s in range(SEEDS)]
    stack = Stack(nets)
    gen = torch.Generator().manual_seed(3)
    obs = torch.randn(SEEDS, 6, 5, generator=gen)
    batched = stack.batched()
    if kind == "value":
        out = batched(obs)
        for i, net in enumerate(nets):
            torch.testing.assert_close(out[i], net(obs[i]), rtol=0, atol=1e-6)
            torch.testing.assert_close(batched.features(obs)[i], net.features(obs[i]),
                                       rtol=0, atol=1e-6)
    else:
        other = stack.detached()
        for p in other.values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        dist, old = batched.dist(obs), stack.batched(other).dist(obs)
        actions = dist.sample()
        out = batched.log_prob(dist, actions)
        for i, net in enumerate(nets):
            own = net.dist(obs[i])
            for name in ("mean", "stddev") if kind == "gaussian" else ("logits",):
                torch.testing.assert_close(getattr(dist, name)[i], getattr(own, name),
                                           rtol=0, atol=1e-6)
            torch.testing.assert_close(out[i], net.log_prob(own, actions[i]), rtol=0,
                                       atol=1e-5)
            torch.testing.assert_close(batched.entropy(dist)[i], net.entropy(own),
                                       rtol=0, atol=1e-5)
            twin = copy.deepcopy(net)
            for name, p in twin.named_parameters():
                p.data.copy_(other[name][i])
            # the batched KL from the network at the other parameters, against the
            # seed's own module loaded with them
            torch.testing.assert_close(batched.kl(old, dist)[i],
                                       net.kl(twin.dist(obs[i]), own), rtol=0, atol=1e-5)
    out.select(-1, 0)[1].sum().backward()  # seed 1's output only
    for p in stack.parameters():
        assert p.grad is not None and p.grad[[0, 2]].abs().sum() == 0
        assert p.grad[1].abs().sum() > 0 or p.dim() == 0


def test_seed_batched_refuses_layers_it_cannot_batch():
    """A network with a layer other than linear layers, activations and plain
    parameters (here a LayerNorm, whose weights would be used unbatched) is refused."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match="LayerNorm"):
        Stack([net, copy.deepcopy(net)]).batched()


def test_flat_params_gradients_accumulate_into_one_matrix_and_a_replaced_grad_is_refused():
    """``backward`` accumulates each stacked parameter's gradient into its view of
    ``FlatParams.grad`` (what the optimizer and clipping read); code that replaces a
    ``.grad`` instead of accumulating into it gets an error, not a step with zeros."""
    gen = torch.Generator().manual_seed(4)
    flat = _flat(_stacked(gen))
    params = list(flat.params.values())
    assert all(p.is_leaf and p.requires_grad for p in params)
    (sum((p * p).sum() for p in params)).backward()
    for p, view in zip(params, flat.views(flat.grad).values(), strict=True):
        assert torch.equal(view, 2 * p.detach())
    flat.zero_grad()
    assert not flat.grad.any()
    params[1].grad = torch.ones_like(params[1])
    adam = MaskedAdam({"value": flat}, {"value": 0.01}, eps=1e-5)
    with pytest.raises(RuntimeError, match="'p1' was replaced"):
        adam.step()
    with pytest.raises(RuntimeError, match="was replaced"):
        clip_gradients_per_seed(flat, 1.0)
