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
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state

from pgscope.networks import one_output

Params = dict[str, torch.Tensor]

# FlatParams' gradients are views of one matrix, whose strides (a row per seed) differ
# from a dense parameter's; torch notes it (once) as a possible slowdown, not an error
warnings.filterwarnings("ignore", category=UserWarning,
                        message="grad and param do not obey the gradient layout contract")


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


class FlatParams:
    """Stacked parameters (``[N, *shape]`` each, a leading seed dim) kept side by side in
    one ``[N, P]`` matrix :attr:`data` (row i: seed i's parameters, in the order of
    ``parameters_to_vector`` for its network), with their gradients in :attr:`grad`, a
    matrix of the same layout.

    Each named parameter (:attr:`params`) is a leaf view of :attr:`data` whose ``.grad``
    is the matching view of :attr:`grad`, so ``backward`` accumulates every gradient into
    :attr:`grad` in place, and the optimizer step, the per-seed gradient norms and
    TRPO's flat steps are a handful of kernel calls on the two matrices however many
    tensors the network has (no concatenation per step). :meth:`zero_grad` zeroes
    :attr:`grad`: a parameter the loss does not reach gets a zero gradient (not
    ``None``). The elementwise results are those of the same operations on separate
    tensors, bit for bit."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.shapes = {k: t.shape[1:] for k, t in tensors.items()}  # one seed's
        self.sizes = [t[0].numel() for t in tensors.values()]
        self.data = side_by_side(t.detach() for t in tensors.values())
        self.grad = torch.zeros_like(self.data)
        self.params: Params = {k: v.requires_grad_() for k, v in self.views(self.data).items()}
        self._grads = self.views(self.grad)
        for k, p in self.params.items():
            p.grad = self._grads[k]

    def __len__(self) -> int:
        return self.data.shape[0]

    def views(self, matrix: torch.Tensor) -> Params:
        """``matrix`` (``[N, P]``, this layout) as one ``[N, *shape]`` view per parameter."""
        return {k: part.view(len(matrix), *shape) for (k, shape), part in
                zip(self.shapes.items(), matrix.split(self.sizes, dim=1), strict=True)}

    def gradient(self) -> torch.Tensor:
        """:attr:`grad`, after checking that every parameter's ``.grad`` is still its view
        of it (code that replaced a ``.grad`` would otherwise be stepped with another
        gradient than its own)."""
        for k, p in self.params.items():
            if p.grad is not self._grads[k]:
                raise RuntimeError(f"the gradient of stacked parameter '{k}' was replaced; "
                                   f"the engine reads gradients from FlatParams.grad, so "
                                   f"accumulate into p.grad in place instead")
        return self.grad

    def zero_grad(self) -> None:
        self.gradient().zero_()

    def select(self, keep: Sequence[int]) -> FlatParams:
        """The seeds at positions ``keep``, as new parameters (gradients zero)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        return FlatParams(self.views(self.data[index]))


class Stack:
    """The parameters of N networks of one architecture, stacked along a leading seed dim
    (``params[name]`` has shape ``[N, *shape]``, a leaf that requires grad), stored as
    :class:`FlatParams` (:attr:`flat_params`: one ``[N, P]`` matrix and its gradient)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        self.module = copy.deepcopy(nets[0]).to("meta")  # the architecture, no storage
        params, buffers = stack_module_state(list(nets))
        if buffers:
            raise TypeError("Stack supports networks without buffers")
        self.flat_params = FlatParams(params)

    @property
    def params(self) -> Params:
        return self.flat_params.params

    def __len__(self) -> int:
        return len(self.flat_params)

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

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the seeds at positions ``keep`` (e.g. after one diverged)."""
        self.flat_params = self.flat_params.select(keep)

    def flat(self) -> torch.Tensor:
        """A copy of the parameters as one ``[N, P]`` matrix, a row per seed, in the order
        of ``parameters_to_vector`` for each seed's network."""
        return self.flat_params.data.clone()

    def unflat(self, matrix: torch.Tensor) -> Params:
        """The inverse of :meth:`flat`: views of ``matrix``, one per parameter."""
        return self.flat_params.views(matrix)

    @torch.no_grad()
    def set_flat(self, matrix: torch.Tensor) -> None:
        """Set the parameters from a ``[N, P]`` matrix (:meth:`flat`'s layout)."""
        self.flat_params.data.copy_(matrix)


def clip_gradients_per_seed(params: FlatParams, max_norm: float | None) -> torch.Tensor:
    """:func:`pgscope.optimizations.clip_gradients` for each seed of one network's stacked
    parameters: each seed's global gradient norm (its row of ``params.grad``), and the
    row scaled by ``max_norm / (norm + 1e-6)`` when that is below 1 and ``max_norm`` is
    given (the scale ``torch.nn.utils.clip_grad_norm_`` uses). Returns the ``[N]`` norms
    before clipping.

    The norm is of all of a seed's gradients side by side (one norm over the row; the
    same norm as ``clip_grad_norm_``'s norm of per-tensor norms up to rounding)."""
    grad = params.gradient()
    norms = torch.linalg.vector_norm(grad, dim=1)
    if max_norm is not None:
        grad.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1))
    return norms
