"""The pieces of the seed-batched update (:mod:`pgscope.batched`), each against the
single-run code it stands for, seed by seed: the masked Adam's ``torch._foreach_*`` step
against ``torch.optim.Adam`` (float64, masks that leave seeds behind with their own step
counts, a stopped seed with a non-finite gradient), the per-seed gradient clipping
against ``torch.nn.utils.clip_grad_norm_``. ``tests/test_batched.py`` checks whole
updates and runs."""

from __future__ import annotations

import pytest
import torch

from pgscope.batched.adam import MaskedAdam
from pgscope.batched.stacked import clip_gradients_per_seed

SEEDS = 3
SHAPES = [(4, 3), (3,), ()]  # a weight, a bias, a scalar: stacked [N, 4, 3], [N, 3], [N]


def _stacked(gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    return [torch.randn(SEEDS, *s, generator=gen, dtype=torch.float64) * scale
            for s in SHAPES]


@pytest.mark.parametrize("dtype, fused, atol", [(torch.float64, False, 1e-15),
                                               (torch.float32, True, 1e-6)])
def test_masked_adam_equals_torch_adam_per_seed(dtype, fused, atol):
    """Each seed moves as its own torch Adam stepped only where its mask is set: the
    seeds' step counts (so their bias corrections) differ, the learning rate changes
    (annealing); float64 to rounding, and float32 against the fused Adam the single engine
    uses. The state converts to torch's layout (``write_to``) and back (``read_from``)."""
    gen = torch.Generator().manual_seed(0)
    params = [p.to(dtype).requires_grad_() for p in _stacked(gen)]
    own = [[torch.nn.Parameter(p[i].detach().clone()) for p in params] for i in range(SEEDS)]
    torch_adams = [torch.optim.Adam([{"params": own[i], "name": "value", "lr": 0.01}],
                                    eps=1e-5, fused=fused) for i in range(SEEDS)]
    adam = MaskedAdam({"value": params}, {"value": 0.01}, eps=1e-5)
    masks = [[0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 1, 1], [1, 0, 1]]
    for step, mask in enumerate(masks):
        lr = 0.01 * (1 - step / 10)
        adam.groups["value"].lr = lr
        grads = [g.to(dtype) for g in _stacked(gen, scale=1 + step)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
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
    fresh = MaskedAdam({"value": [torch.zeros_like(p) for p in params]}, {"value": 0.01},
                       eps=1e-5)
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
    params = [p.requires_grad_() for p in _stacked(gen)]
    adam = MaskedAdam({"value": params}, {"value": 0.01}, eps=1e-5)
    for p, g in zip(params, _stacked(gen), strict=True):
        p.grad = g
    adam.step()
    group = adam.groups["value"]
    before = [t.detach().clone() for t in params + group.exp_avg + group.exp_avg_sq]
    for p, g in zip(params, _stacked(gen), strict=True):
        g[1] = float("nan")
        p.grad = g
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
    params = [torch.zeros(SEEDS, *s, dtype=torch.float64) for s in SHAPES]
    grads = _stacked(gen)
    for k, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.grad = g * torch.tensor([0.01, 1.0, 5.0], dtype=torch.float64).view(
            -1, *[1] * (g.dim() - 1)) * (k + 1)
    own = [[torch.nn.Parameter(p[i].clone()) for p in params] for i in range(SEEDS)]
    for i in range(SEEDS):
        for q, p in zip(own[i], params, strict=True):
            q.grad = p.grad[i].clone()
    norms = clip_gradients_per_seed(params, max_norm)
    for i in range(SEEDS):
        want = torch.nn.utils.clip_grad_norm_(own[i], max_norm if max_norm else float("inf"))
        torch.testing.assert_close(norms[i], want, rtol=0, atol=1e-14)
        for p, q in zip(params, own[i], strict=True):
            torch.testing.assert_close(p.grad[i], q.grad, rtol=0, atol=1e-15)
    if max_norm is not None:
        assert norms[0] < max_norm < norms[2]  # one seed unclipped, one clipped
