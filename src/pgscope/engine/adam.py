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

import math
from collections.abc import Mapping, Sequence

import torch

from pgscope.engine.stacked import FlatParams


class _Group:
    """One named group: its stacked parameters (:class:`FlatParams`, ``[N, P]`` with its
    gradient), the moments as ``[N, P]`` matrices of the same layout (``exp_avg[k]``:
    the k-th parameter's view), each seed's step count and the lr."""

    def __init__(self, params: FlatParams, steps: list[int], lr: float) -> None:
        self.params, self.steps, self.lr = params, steps, lr
        self.exp_avg_flat = torch.zeros_like(params.data)
        self.exp_avg_sq_flat = torch.zeros_like(params.data)

    @property
    def step(self) -> torch.Tensor:
        """The seeds' step counts, ``[N]`` (float32, as ``torch.optim.Adam`` keeps one)."""
        return torch.tensor(self.steps, dtype=torch.float32)

    @property
    def exp_avg(self) -> list[torch.Tensor]:
        return list(self.params.views(self.exp_avg_flat).values())

    @property
    def exp_avg_sq(self) -> list[torch.Tensor]:
        return list(self.params.views(self.exp_avg_sq_flat).values())


class MaskedAdam:
    """Adam for stacked parameters (:class:`FlatParams`, a leading seed dim) in named
    groups (``policy``, ``value``, as :func:`pgscope.algos.common.make_optimizer` names
    them)."""

    def __init__(self, groups: Mapping[str, FlatParams], lr: Mapping[str, float],
                 eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.eps, self.betas = eps, betas
        self.groups = {name: _Group(params, [0] * len(params), lr[name])
                       for name, params in groups.items()}
        self._corrections: dict[tuple[tuple[int, ...], float, torch.dtype],
                                tuple[torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for group in self.groups.values():
            group.params.zero_grad()

    def bias_corrections(self, steps: Sequence[int], lr: float, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per seed (``[N, 1]``), ``sqrt(1 - beta2^t)`` and the step size
        ``-lr / (1 - beta1^t)``, computed in Python's floats (float64) as the
        single-tensor ``torch.optim.Adam`` computes them; a seed that never stepped
        (t = 0) is masked anyway. Groups stepped together share them."""
        key = (tuple(steps), lr, dtype)
        if key not in self._corrections:
            beta1, beta2 = self.betas
            self._corrections.clear()
            self._corrections[key] = (
                torch.tensor([[math.sqrt(1 - beta2 ** max(t, 1))] for t in steps], dtype=dtype),
                torch.tensor([[-lr / (1 - beta1 ** max(t, 1))] for t in steps], dtype=dtype))
        return self._corrections[key]

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None = None, groups: Sequence[str] | None = None
             ) -> None:
        """One Adam step of the seeds where ``mask`` (``[N]`` bool; default all) is set,
        for the named ``groups`` (default all); the other seeds are left exactly as
        they are.

        All seeds are stepped at once on the group's ``[N, P]`` matrices (one row per
        seed: a handful of kernel calls however many parameter tensors there are, each
        seed's own bias corrections broadcast along its row); the rows of the seeds
        outside ``mask`` are then put back as they were."""
        beta1, beta2 = self.betas
        on = None if mask is None else mask.tolist()
        off = [] if on is None else [i for i, stepped in enumerate(on) if not stepped]
        rows = torch.tensor(off, dtype=torch.long)
        for name in groups or list(self.groups):
            group = self.groups[name]
            data, grad = group.params.data, group.params.gradient()
            kept = [(t, t[rows]) for t in (data, group.exp_avg_flat, group.exp_avg_sq_flat)
                    ] if off else []
            group.steps = [t if i in off else t + 1 for i, t in enumerate(group.steps)]
            bias2_sqrt, step_size = self.bias_corrections(group.steps, group.lr, data.dtype)
            group.exp_avg_flat.lerp_(grad, 1 - beta1)
            group.exp_avg_sq_flat.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = group.exp_avg_sq_flat.sqrt().div_(bias2_sqrt).add_(self.eps)
            data.add_(group.exp_avg_flat.div(denom).mul_(step_size))
            for t, saved in kept:
                t[rows] = saved

    def select(self, keep: Sequence[int], params: Mapping[str, FlatParams]) -> None:
        """Keep the seeds at positions ``keep``; ``params`` are the groups' new stacked
        parameters (after :meth:`pgscope.engine.stacked.Stack.select`)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        for name, group in self.groups.items():
            new = _Group(params[name], [group.steps[i] for i in keep], group.lr)
            new.exp_avg_flat.copy_(group.exp_avg_flat[index])
            new.exp_avg_sq_flat.copy_(group.exp_avg_sq_flat[index])
            self.groups[name] = new

    def write_to(self, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """Put seed ``seed``'s moments and step count into that seed's own
        ``torch.optim.Adam`` (built by ``make_optimizer``: same groups, same parameter
        order), e.g. to save it in the single-run checkpoint format."""
        for torch_group in optimizer.param_groups:
            group = self.groups[torch_group["name"]]
            moments = zip(group.exp_avg, group.exp_avg_sq, strict=True)
            for p, (exp_avg, exp_avg_sq) in zip(torch_group["params"], moments, strict=True):
                if group.steps[seed] == 0:
                    optimizer.state.pop(p, None)
                    continue
                optimizer.state[p] = {"step": group.step[seed].clone(),
                                      "exp_avg": exp_avg[seed].clone(),
                                      "exp_avg_sq": exp_avg_sq[seed].clone()}

    @torch.no_grad()
    def read_from(self, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """The inverse of :meth:`write_to` (e.g. after loading a checkpoint into it)."""
        for torch_group in optimizer.param_groups:
            group = self.groups[torch_group["name"]]
            moments = zip(group.exp_avg, group.exp_avg_sq, strict=True)
            group.steps[seed] = 0
            for p, (exp_avg, exp_avg_sq) in zip(torch_group["params"], moments, strict=True):
                state = optimizer.state.get(p)
                exp_avg[seed] = state["exp_avg"] if state else 0
                exp_avg_sq[seed] = state["exp_avg_sq"] if state else 0
                if state:
                    group.steps[seed] = int(state["step"])
