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

from pgscope.engine.stacked import side_by_side


class _Group:
    """One named group: its stacked parameters, its moments as ``[N, P]`` matrices (one
    row per seed, the parameters side by side) with a per-parameter view of each
    (``exp_avg[k]`` has ``params[k]``'s shape), its per-seed step counts and its lr."""

    def __init__(self, params: list[torch.Tensor], step: torch.Tensor, lr: float) -> None:
        self.params, self.step, self.lr = params, step, lr
        n = params[0].shape[0]
        self.sizes = [p[0].numel() for p in params]
        self.exp_avg_flat = params[0].new_zeros(n, sum(self.sizes))
        self.exp_avg_sq_flat = torch.zeros_like(self.exp_avg_flat)
        self.exp_avg = self.views(self.exp_avg_flat)
        self.exp_avg_sq = self.views(self.exp_avg_sq_flat)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[N, P]`` as one ``[N, *shape]`` view per parameter."""
        return [part.view_as(p) for part, p in zip(flat.split(self.sizes, dim=1),
                                                   self.params, strict=True)]

    def flat_grad(self, name: str) -> torch.Tensor:
        """The parameters' gradients side by side: ``[N, P]``."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) < len(self.params):
            raise ValueError(f"every stacked parameter of group '{name}' needs a gradient")
        return side_by_side(grads)


class _KeptRows:
    """The rows ``rows`` (seed positions) of ``tensors`` as they are now, to be put back
    by :meth:`restore`."""

    def __init__(self, rows: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        self.rows = rows
        self.saved = [(t, t[rows]) for t in tensors] if len(rows) else []

    def restore(self) -> None:
        for t, rows in self.saved:
            t[self.rows] = rows


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
            self.groups[name] = _Group(params, torch.zeros(n), lr[name])

    def zero_grad(self) -> None:
        for group in self.groups.values():
            for p in group.params:
                p.grad = None

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None = None, groups: Sequence[str] | None = None
             ) -> None:
        """One Adam step of the seeds where ``mask`` (``[N]`` bool; default all) is set,
        for the named ``groups`` (default all); the other seeds are left exactly as
        they are.

        All seeds are stepped at once on the group's ``[N, P]`` matrices (gradients side
        by side, one row per seed: a handful of kernel calls however many parameter
        tensors there are, each seed's own bias corrections broadcast along its row);
        the rows of the seeds outside ``mask`` are then put back as they were."""
        beta1, beta2 = self.betas
        for name in groups or list(self.groups):
            group = self.groups[name]
            grad = group.flat_grad(name)
            on = [True] * len(group.step) if mask is None else mask.tolist()
            off = [i for i, stepped in enumerate(on) if not stepped]
            kept = _KeptRows(torch.tensor(off, dtype=torch.long),
                             [*group.params, group.exp_avg_flat, group.exp_avg_sq_flat])
            steps = [s + 1 if stepped else s
                     for s, stepped in zip(group.step.tolist(), on, strict=True)]
            group.step = torch.tensor(steps, dtype=group.step.dtype)
            # the bias corrections in Python's floats (float64), per seed, as the
            # single-tensor torch.optim.Adam computes them; seeds that never stepped are
            # masked anyway
            dtype = group.params[0].dtype
            bias2_sqrt = torch.tensor([math.sqrt(1 - beta2 ** max(s, 1)) for s in steps],
                                      dtype=dtype).unsqueeze(1)
            step_size = torch.tensor([-group.lr / (1 - beta1 ** max(s, 1)) for s in steps],
                                     dtype=dtype).unsqueeze(1)
            group.exp_avg_flat.lerp_(grad, 1 - beta1)
            group.exp_avg_sq_flat.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = group.exp_avg_sq_flat.sqrt().div_(bias2_sqrt).add_(self.eps)
            update = group.exp_avg_flat.div(denom).mul_(step_size)
            torch._foreach_add_(group.params, group.views(update))
            kept.restore()

    def select(self, keep: Sequence[int], params: Mapping[str, Sequence[torch.Tensor]]
               ) -> None:
        """Keep the seeds at positions ``keep``; ``params`` are the groups' new stacked
        parameters (after :meth:`pgscope.engine.stacked.Stack.select`)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        for name, group in self.groups.items():
            new = _Group(list(params[name]), group.step[index], group.lr)
            new.exp_avg_flat.copy_(group.exp_avg_flat[index])
            new.exp_avg_sq_flat.copy_(group.exp_avg_sq_flat[index])
            self.groups[name] = new

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
