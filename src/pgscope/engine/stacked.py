"""N networks of one architecture as one set of stacked parameters (a leading seed dim).

:class:`Stack` holds the parameters of N copies of a network, stacked with
:func:`torch.func.stack_module_state`. :meth:`Stack.batched` gives the network's methods
for all seeds at once (:class:`SeedBatched`): a copy of the architecture whose
``nn.Linear`` layers are batched matmuls over the stacked weights (``torch.baddbmm``), so
``policy.dist(obs)`` with ``obs`` of shape ``[N, m, obs_dim]`` returns seed i's
distribution in row i. The single-run pieces (the PPO loss, value loss, advantage
normalization, KL, ...) reduce over the last (sample) dim, so they run unchanged on
``[N, m]`` tensors and give one value per seed; summing the seeds' losses and calling
``backward`` gives each seed its own gradient, since no seed's loss depends on another
seed's parameters.

The engine's first form ran the single network through ``torch.func.vmap`` over
``functional_call``, which swaps the module's parameters on every call; on Hopper sizes
(8 seeds, 64x64 tanh, minibatch 64, one core) this form does a PPO update phase in about
0.8 of that one's CPU time (docs/benchmarks.md, "Seed-batched training").
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state

from pgscope.networks import one_output

Params = dict[str, torch.Tensor]


def side_by_side(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Stacked tensors (``[N, ...]`` each) as one ``[N, P]`` matrix: row i holds seed i's
    entries of every tensor in turn, as ``parameters_to_vector`` orders one network's."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


class _SeedLinear(nn.Module):
    """``nn.Linear`` for every seed at once: ``[N, m, in] -> [N, m, out]`` with seed i's
    weight ``params[name + ".weight"][i]`` and bias ``params[name + ".bias"][i]``."""

    def __init__(self, params: Params, name: str) -> None:
        super().__init__()
        self.params, self.name = params, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.params[self.name + ".weight"]
        bias = self.params[self.name + ".bias"]
        if weight.shape[1] == 1:  # [N, 1, in]: broadcast over each seed's rows
            return one_output(x, weight, bias.unsqueeze(1))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class SeedBatched:
    """A network's methods (``dist``, ``forward``, ``features``, the static ``log_prob``,
    ``kl``, ...) for all seeds at once at stacked ``params``: inputs and outputs carry the
    seed dim first (``[N, m, ...]``). Parameters other than linear layers' (a Gaussian
    policy's ``log_std``, ``[N, act]``) reach the methods as ``[N, 1, ...]`` views, so
    they broadcast over the samples as the single network's ``[act]`` does over
    ``[m, act]``."""

    def __init__(self, architecture: nn.Module, params: Params) -> None:
        self.module = copy.deepcopy(architecture)
        self.params = params
        for owner_name, owner in list(self.module.named_modules()):
            for child_name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    name = f"{owner_name}.{child_name}" if owner_name else child_name
                    setattr(owner, child_name, _SeedLinear(params, name))
        for owner_name, owner in self.module.named_modules():
            if owner_name and next(owner.parameters(recurse=False), None) is not None:
                raise TypeError(f"SeedBatched batches linear layers and the network's own "
                                f"parameters only, not {type(owner).__name__} ({owner_name})")
        self._others = list(self.module._parameters)  # e.g. log_std: the network's own
        for name in self._others:
            del self.module._parameters[name]

    def __getattr__(self, name: str) -> Any:
        for key in self._others:  # fresh views of the current parameters
            object.__setattr__(self.module, key, self.params[key].unsqueeze(1))
        return getattr(self.module, name)

    def __call__(self, *args: Any) -> Any:
        return self.__getattr__("forward")(*args)


class Stack:
    """The parameters of N networks of one architecture, stacked along a leading seed dim
    (``params[name]`` has shape ``[N, *shape]``, a leaf that requires grad)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        self.module = copy.deepcopy(nets[0]).to("meta")  # the architecture, no storage
        params, buffers = stack_module_state(list(nets))
        if buffers:
            raise TypeError("Stack supports networks without buffers")
        self.params: Params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.params.values())

    def batched(self, params: Params | None = None) -> SeedBatched:
        """The network's methods for all seeds at ``params`` (default: the parameters,
        through which gradients flow; e.g. :meth:`detached` for theta_old)."""
        return SeedBatched(self.module, self.params if params is None else params)

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

    def flat(self) -> torch.Tensor:
        """The parameters as one ``[N, P]`` matrix, a row per seed, in the order of
        ``parameters_to_vector`` for each seed's network."""
        return side_by_side(self.params.values())

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


def clip_gradients_per_seed(params: Iterable[torch.Tensor], max_norm: float | None
                            ) -> torch.Tensor:
    """:func:`pgscope.optimizations.clip_gradients` for each seed of stacked parameters:
    each seed's global gradient norm over ``params`` (one network), clipped to
    ``max_norm`` when given (the same ``max_norm / (norm + 1e-6)`` scale as
    ``torch.nn.utils.clip_grad_norm_``). Returns the ``[N]`` norms before clipping.

    The norms come from all of a seed's gradients side by side (one ``[N, P]``
    concatenation, one norm; the same norm as ``clip_grad_norm_``'s norm of per-tensor
    norms up to rounding) and one ``torch._foreach_mul_`` scales them."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.linalg.vector_norm(side_by_side(grads), dim=1)
    if max_norm is not None:
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [scale.view(-1, *[1] * (g.dim() - 1)) for g in grads])
    return norms
