"""Seed-batched training: N seeds of one config trained together in one process.

:func:`train_batch` trains the seeds, each into an ordinary run directory; the rollouts
step every seed's envs in lockstep with one stacked forward pass per step
(:mod:`~pgscope.batched.rollout`) and the updates do one seed-batched forward/backward
per minibatch index for all seeds (:mod:`~pgscope.batched.ppo`, :mod:`~pgscope.batched.trpo`;
stacked parameters in :mod:`~pgscope.batched.stacked`, a per-seed masked Adam in
:mod:`~pgscope.batched.adam`). Seed i of a batch follows the same algorithm, on the same
data streams, as a single run of seed i (``tests/test_batched.py``).
"""

from pgscope.batched import ppo as ppo  # noqa: F401 - each registers its batched update
from pgscope.batched import trpo as trpo  # noqa: F401
from pgscope.batched.train import (
    DEFAULT_BATCH_SIZE,
    BatchMember,
    check_action_space,
    check_batchable,
    parse_seeds,
    seed_run_dir,
    train_batch,
    train_seeds,
)

__all__ = ["DEFAULT_BATCH_SIZE", "BatchMember", "check_action_space", "check_batchable",
           "parse_seeds", "seed_run_dir", "train_batch", "train_seeds"]
