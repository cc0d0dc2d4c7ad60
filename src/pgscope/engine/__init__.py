"""The one training engine's shared machinery: N >= 1 seeds of one config trained together,
a single run being the batch of one.

- :mod:`~pgscope.engine.stacked`: the seeds' networks as stacked parameters, with each
  network's methods run for all seeds at once (batched matmuls);
- :mod:`~pgscope.engine.adam`: Adam on the stacks, per-seed step counts and masks;
- :mod:`~pgscope.engine.nets`: what every algorithm's update works on (the seeds' nets,
  their stacked batches, per-seed minibatches, KLs and phase statistics);
- :mod:`~pgscope.engine.lockstep` and :mod:`~pgscope.engine.rollout`: the seeds' rollouts
  stepped together, one stacked forward pass per env step.

The loop that drives them is :func:`pgscope.train.train_batch`; each algorithm's update
(:mod:`pgscope.algos`) is written once over these pieces. Every piece computes a seed's
numbers with operations whose per-seed result does not depend on how many seeds are
stacked, so a seed's metrics and checkpoints are bit-identical alone or in any batch
(docs/architecture.md, "One engine"; tests/test_engine_invariance.py).
"""
