"""N networks of one architecture as one set of stacked parameters (a leading seed dim).

:class:`Stack` holds the parameters of N copies of a network, stacked with
:func:`torch.func.stack_module_state`, and runs any method of the network for all seeds at
once with :func:`torch.func.vmap` over :func:`torch.func.functional_call`. Inside a
vmapped function every tensor is one seed's, so the single-run pieces (the PPO loss, value
loss, advantage normalization, KL, ...) run unchanged and each reduction stays per seed;
summing the seeds' losses and calling ``backward`` gives each seed its own gradient, since
no seed's loss depends on another seed's parameters.

Measured at N = 16 seeds, 64x64 tanh nets, minibatch 64, on one CPU core: one PPO
forward/backward through ``vmap`` costs about 4x a single seed's, the same written as
batched matmuls (``torch.baddbmm``) about 3x (docs/benchmarks.md, "Seed-batched
training"). The matmul form would need its own copy of every loss; ``vmap`` reuses them,
and the update is the smaller part of a batched iteration.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution
from torch.func import functional_call, stack_module_state

Params = dict[str, torch.Tensor]


class _Method(nn.Module):
    """Calls ``module.<name>(*args)`` from ``forward``, so that ``functional_call`` can
    run any method of the module (``dist``, ``forward``, ...) at given parameters."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, name: str, *args: Any) -> Any:
        return getattr(self.module, name)(*args)


class Stack:
    """The parameters of N networks of one architecture, stacked along a leading seed dim
    (``params[name]`` has shape ``[N, *shape]``, a leaf that requires grad)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        self.module = copy.deepcopy(nets[0]).to("meta")  # the architecture, no storage
        self._method = _Method(self.module)
        params, buffers = stack_module_state(list(nets))
        if buffers:
            raise TypeError("Stack supports networks without buffers")
        self.params: Params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.params.values())

    def call(self, params: Params, method: str, *args: Any) -> Any:
        """``net.<method>(*args)`` at ``params`` (one seed's, inside ``vmap``)."""
        named = {f"module.{k}": v for k, v in params.items()}
        return functional_call(self._method, named, (method, *args))

    def detached(self) -> Params:
        """A copy of the parameters that no gradient flows into (e.g. theta_old)."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def write_to(self, nets: Sequence[nn.Module]) -> None:
        """Copy seed i's parameters into ``nets[i]``."""
        for i, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(self.params[name][i])

    @torch.no_grad()
    def select(self, keep: Sequence[int]) -> None:
        """Keep only the seeds at positions ``keep`` (e.g. after one diverged)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        self.params = {k: p[index].clone().requires_grad_() for k, p in self.params.items()}

    def flat(self, tensors: Params | None = None) -> torch.Tensor:
        """``tensors`` (default: the parameters) as one ``[N, P]`` matrix, a row per seed,
        in the order of ``parameters_to_vector`` for each seed's network."""
        tensors = self.params if tensors is None else tensors
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors.values()], dim=1)

    def unflat(self, matrix: torch.Tensor) -> Params:
        """The inverse of :meth:`flat`."""
        out, start = {}, 0
        for k, p in self.params.items():
            size = p[0].numel()
            out[k] = matrix[:, start:start + size].reshape(p.shape)
            start += size
        return out

    @torch.no_grad()
    def set_flat(self, matrix: torch.Tensor) -> None:
        """Set the parameters from a ``[N, P]`` matrix (:meth:`flat`'s layout)."""
        for k, v in self.unflat(matrix).items():
            self.params[k].copy_(v)


class BoundPolicy:
    """A policy's methods at one seed's parameters (inside ``vmap``), so that the single-run
    functions that take a policy (:func:`pgscope.algos.ppo.policy_loss`,
    :func:`pgscope.algos.common.log_ratio`, ...) run unchanged on a :class:`Stack`."""

    def __init__(self, stack: Stack, params: Params) -> None:
        self.stack = stack
        self.params = params

    def dist(self, obs: torch.Tensor) -> Distribution:
        dist: Distribution = self.stack.call(self.params, "dist", obs)
        return dist

    def __getattr__(self, name: str) -> Any:
        # log_prob, entropy, kl, discrete: static, no parameters involved
        return getattr(self.stack.module, name)


def clip_gradients_per_seed(params: Sequence[torch.Tensor], max_norm: float | None
                            ) -> torch.Tensor:
    """:func:`pgscope.optimizations.clip_gradients` for each seed of stacked parameters:
    each seed's global gradient norm over ``params`` (one network), clipped to
    ``max_norm`` when given (the same ``max_norm / (norm + 1e-6)`` scale as
    ``torch.nn.utils.clip_grad_norm_``). Returns the ``[N]`` norms before clipping.

    The norms come from all of a seed's gradients side by side (one ``[N, P]``
    concatenation, one norm; the same norm as ``clip_grad_norm_``'s norm of per-tensor
    norms up to rounding) and one ``torch._foreach_mul_`` scales them."""
    grads = [p.grad for p in params if p.grad is not None]
    side_by_side = torch.cat([g.reshape(len(g), -1) for g in grads], dim=1)
    norms = torch.linalg.vector_norm(side_by_side, dim=1)
    if max_norm is not None:
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [scale.view(-1, *[1] * (g.dim() - 1)) for g in grads])
    return norms
