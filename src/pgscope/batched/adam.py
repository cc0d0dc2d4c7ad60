"""Adam on stacked parameters, each seed with its own step count, stepping only the seeds
a mask selects.

``torch.optim.Adam`` on stacked parameters would be exact only if every seed stepped at
every call: with KL early stopping (``kl_stop``) seeds end their epochs at different
times, and a seed that has stopped must keep its parameters, moments and step count.
:class:`MaskedAdam` is Adam's update (Kingma and Ba, 2015, with the bias corrections and
the epsilon outside the square root, as ``torch.optim.Adam``) applied per seed under a
mask, with a per-seed step count; :meth:`MaskedAdam.write_to` and
:meth:`MaskedAdam.read_from` translate to and from each seed's own ``torch.optim.Adam``
(the single-run checkpoint layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class _Group:
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    step: torch.Tensor  # [N] float32, as torch.optim.Adam keeps it
    lr: float


def _per_seed(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N]`` values shaped to broadcast against a stacked ``[N, ...]`` tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


class MaskedAdam:
    """Adam for stacked parameters (leading seed dim) in named groups (``policy``,
    ``value``, as :func:`pgscope.algos.common.make_optimizer` names them)."""

    def __init__(self, groups: Mapping[str, Sequence[torch.Tensor]], lr: Mapping[str, float],
                 eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.eps, self.betas = eps, betas
        self.groups: dict[str, _Group] = {}
        for name, params in groups.items():
            params = list(params)
            n = params[0].shape[0]
            self.groups[name] = _Group(params, [torch.zeros_like(p) for p in params],
                                       [torch.zeros_like(p) for p in params],
                                       torch.zeros(n), lr[name])

    def zero_grad(self) -> None:
        for group in self.groups.values():
            for p in group.params:
                p.grad = None

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None = None, groups: Sequence[str] | None = None
             ) -> None:
        """One Adam step of the seeds where ``mask`` (``[N]`` bool; default all) is set,
        for the named ``groups`` (default all); the other seeds are left exactly as
        they are."""
        beta1, beta2 = self.betas
        for name in groups or list(self.groups):
            group = self.groups[name]
            on = torch.ones_like(group.step, dtype=torch.bool) if mask is None else mask
            group.step = torch.where(on, group.step + 1, group.step)
            step = group.step.clamp(min=1)  # seeds that never stepped are masked anyway
            bias1 = 1 - beta1 ** step
            bias2_sqrt = (1 - beta2 ** step).sqrt()
            for i, p in enumerate(group.params):
                assert p.grad is not None, "every stacked parameter needs a gradient"
                g, sel = p.grad, _per_seed(on, p)
                m = group.exp_avg[i].lerp(g, 1 - beta1)
                v = group.exp_avg_sq[i] * beta2 + (1 - beta2) * g * g
                denom = v.sqrt() / _per_seed(bias2_sqrt, p) + self.eps
                new = p - _per_seed(group.lr / bias1, p) * m / denom
                group.exp_avg[i] = torch.where(sel, m, group.exp_avg[i])
                group.exp_avg_sq[i] = torch.where(sel, v, group.exp_avg_sq[i])
                p.copy_(torch.where(sel, new, p))

    def select(self, keep: Sequence[int], params: Mapping[str, Sequence[torch.Tensor]]
               ) -> None:
        """Keep the seeds at positions ``keep``; ``params`` are the groups' new stacked
        parameters (after :meth:`pgscope.batched.stacked.Stack.select`)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        for name, group in self.groups.items():
            group.params = list(params[name])
            group.exp_avg = [m[index] for m in group.exp_avg]
            group.exp_avg_sq = [v[index] for v in group.exp_avg_sq]
            group.step = group.step[index]

    def write_to(self, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """Put seed ``seed``'s moments and step count into that seed's own
        ``torch.optim.Adam`` (built by ``make_optimizer``: same groups, same parameter
        order), e.g. to save it in the single-run checkpoint format."""
        for torch_group in optimizer.param_groups:
            group = self.groups[torch_group["name"]]
            for i, p in enumerate(torch_group["params"]):
                if group.step[seed] == 0:
                    optimizer.state.pop(p, None)
                    continue
                optimizer.state[p] = {"step": group.step[seed].clone(),
                                      "exp_avg": group.exp_avg[i][seed].clone(),
                                      "exp_avg_sq": group.exp_avg_sq[i][seed].clone()}

    def read_from(self, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """The inverse of :meth:`write_to` (e.g. after loading a checkpoint into it)."""
        for torch_group in optimizer.param_groups:
            group = self.groups[torch_group["name"]]
            for i, p in enumerate(torch_group["params"]):
                state = optimizer.state.get(p)
                with torch.no_grad():
                    if not state:
                        group.step[seed] = 0
                        group.exp_avg[i][seed] = 0
                        group.exp_avg_sq[i][seed] = 0
                        continue
                    group.step[seed] = float(state["step"])
                    group.exp_avg[i][seed] = state["exp_avg"]
                    group.exp_avg_sq[i][seed] = state["exp_avg_sq"]
