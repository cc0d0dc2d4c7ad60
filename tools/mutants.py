"""Curated mutation check: does the fast test selection catch each planted wiring bug?

Each mutant is one exact text replacement in one source file: a single-point semantic bug
of the kind a reviewer plants (a switch ignored, a sign flipped, a statistic taken over the
wrong set, state not restored). For every mutant this script copies the repository's
``src/`` and ``tests/`` (and ``pyproject.toml``, for the pytest settings, and ``bench/``,
which some tests read) to a temporary directory, applies the replacement there - never in
the working tree - and runs the fast test selection against the copy. A mutant is *killed*
when a test fails.

Which pgscope is imported: the package is installed in ``.venv`` in editable mode (a
``.pth`` line that puts the working tree's ``src`` on ``sys.path``). The tests therefore
run under a throw-away interpreter environment (``python -m venv`` without pip) whose own
``.pth`` puts the copy's ``src`` first and then adds ``.venv``'s site-packages for the
dependencies; ``PYTHONPATH`` points at the copy as well. A subprocess started with
``sys.executable`` - even one that replaces ``PYTHONPATH``, as the kill -9 test does - gets
the same interpreter and so the mutated copy. Before the mutants run, the script checks
this: the unmutated selection must pass, a mutant that raises at import must be killed, and
a subprocess with its own ``PYTHONPATH`` must import pgscope from the copy.

Every pattern must match exactly once in the current source; a pattern that matches 0 or
2+ times is reported (with all others) before anything runs, so drift in the source is
caught rather than silently skipped.

Usage (from the repository root; ``make mutants`` runs the first)::

    .venv/bin/python tools/mutants.py                 # all curated mutants
    .venv/bin/python tools/mutants.py --list          # names and descriptions
    .venv/bin/python tools/mutants.py --only kl-stop-never --only ent-sign
    .venv/bin/python tools/mutants.py --jobs 2 --write-docs   # table into docs/testing.md

Exit status: 0 when every mutant was killed, 1 when one survived, 2 when a pattern does not
match exactly once or the set-up checks fail.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The fast selection every mutant runs against (in this order; ``-x`` stops at the first
#: failure). Files listed in OPTIONAL_TESTS join it when they exist.
FAST_TESTS = [
    "tests/test_optimizations.py",
    "tests/test_gae.py",
    "tests/test_config.py",
    "tests/test_wiring.py",
    "tests/test_trpo.py",
    "tests/test_batched_update.py",
    "tests/test_engine.py",
    "tests/test_batch_step.py",
    # each of these four kills an engine-path mutant no file above kills (train() raising a
    # single run's error, trpo+-paper's constant limit, update_one's epoch_callback through
    # the trust-region probe, a Discrete-action seed the same alone and in a batch);
    # together about 70 s on one core
    "tests/test_callbacks.py",
    "tests/test_paper_presets.py",
    "tests/test_a2c.py",
    "tests/test_engine_invariance.py",
    "tests/test_trust_region_replay.py",
    "tests/test_seeds_study.py",
    "tests/test_algorithm_reads.py",
    # the first hour's features and the reliability, sensitivity and robustness measures
    "tests/test_periodic_eval.py",
    "tests/test_features.py",
    "tests/test_reliability_metrics.py",
    "tests/test_sensitivity.py",
    "tests/test_perturb.py",
    "tests/test_export.py",
]
OPTIONAL_TESTS = ["tests/test_reference_updates.py"]
#: What each sandbox holds besides ``pyproject.toml``: the sources, the tests, and
#: ``bench/``, whose scripts and study files tests/test_paper_presets.py reads.
COPIED = ("src", "tests", "bench")
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
TIMEOUT_S = 600  # per mutant; a hang counts as killed (reported as "timeout")

DOCS = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- mutants:begin -->", "<!-- mutants:end -->"


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``file``."""

    name: str
    file: str  # relative to src/pgscope
    old: str
    new: str
    description: str


M = Mutant
MUTANTS: list[Mutant] = [
    # --- the reviewer's ten survivors -------------------------------------------------------
    M("kl-stop-never", "algos/ppo.py",
      "active &= torch.tensor([not kl_early_stop(",
      "active |= torch.tensor([not kl_early_stop(",
      "KL early stopping never triggers"),
    M("ent-sign", "algos/ppo.py",
      "(loss - bonus + v_loss + dr3).sum().backward()",
      "(loss + bonus + v_loss + dr3).sum().backward()",
      "entropy bonus with the wrong sign"),
    M("store-clipped-action", "engine/rollout.py",
      "        buf.actions[:, t] = actions\n",
      "        buf.actions[:, t] = actions if first.discrete else clip_stacked_actions(\n"
      "            actions, first)\n",
      "the clipped action is stored (and scored) instead of the sampled one"),
    M("value-grad-unclipped", "algos/ppo.py",
      "clip_gradients_per_seed(nets.value.flat_params, grad_limit)",
      "clip_gradients_per_seed(nets.value.flat_params, None)",
      "value net's gradient not clipped while the policy's is"),
    M("obs-clip-ignored", "rollout.py",
      "self.obs_clip = cfg.obs_clip_bound if cfg.obs_clip else None", "self.obs_clip = None",
      "obs_clip ignored"),
    M("adv-norm-whole-batch", "algos/ppo.py",
      "        for mb in seed_minibatches(batch, cfg, generators, active):  # [N, m, ...]\n"
      "            dist = policy.dist(mb.obs)\n"
      "            ratio = log_ratio(policy, dist, mb.actions, mb.logp).exp()\n"
      "            adv = normalize_advantages(mb.advantages, cfg.adv_norm)\n",
      "        whole = batch._replace(advantages=normalize_advantages(batch.advantages,\n"
      "                                                               cfg.adv_norm))\n"
      "        for mb in seed_minibatches(whole, cfg, generators, active):  # [N, m, ...]\n"
      "            dist = policy.dist(mb.obs)\n"
      "            ratio = log_ratio(policy, dist, mb.actions, mb.logp).exp()\n"
      "            adv = mb.advantages\n",
      "advantages normalized over the whole batch instead of per minibatch"),
    M("value-clip-ignored", "algos/ppo.py",
      "value_clip = cfg.value_clip_range if cfg.value_clip else None", "value_clip = None",
      "value-loss clipping ignored (PPO)"),
    M("value-lr-not-annealed", "algos/common.py",
      'group["lr"] = annealed_lr(base, iteration, cfg.num_iterations, cfg.lr_anneal)',
      'group["lr"] = annealed_lr(base, iteration, cfg.num_iterations,\n'
      '                                  cfg.lr_anneal and group["name"] == "policy")',
      "the value lr is not annealed"),
    M("optimizer-not-restored", "train.py",
      '            self.optimizer.load_state_dict(ckpt["optimizer"])\n', "",
      "optimizer state (Adam moments, step) not restored on resume"),
    M("frozen-obs-stats-update", "rollout.py",
      "if update and not self.statistics_frozen:", "if update:",
      "observation statistics still update when frozen"),
    M("frozen-reward-stats-update", "rollout.py",
      "self.reward_scaler(out, done, update=not self.statistics_frozen)",
      "self.reward_scaler(out, done, update=True)",
      "reward statistics still update when frozen"),
    # --- GAE and rewards --------------------------------------------------------------------
    M("gae-lambda-ignored", "rollout.py",
      "decay = gamma * lam * (1.0 - done)",
      "decay = gamma * (1.0 - done)",
      "GAE lambda ignored (lambda = 1)"),
    M("bootstrap-at-termination", "rollout.py",
      "delta = rewards + gamma * next_values * (1.0 - terminated) - values",
      "delta = rewards + gamma * next_values - values",
      "GAE bootstraps at termination"),
    M("no-bootstrap-at-truncation", "rollout.py",
      "delta = rewards + gamma * next_values * (1.0 - terminated) - values",
      "delta = rewards + gamma * next_values * (1.0 - done) - values",
      "GAE does not bootstrap at truncation"),
    M("gae-args-lambda-is-gamma", "rollout.py",
      "cfg.gamma, cfg.gae_lambda)", "cfg.gamma, cfg.gamma)",
      "the rollout passes gamma as GAE's lambda"),
    M("reward-scale-by-variance", "optimizations.py",
      "scaled = rewards / np.sqrt(self.rms.var + self.epsilon)",
      "scaled = rewards / (self.rms.var + self.epsilon)",
      "rewards divided by the variance of the return instead of its std"),
    M("reward-scaler-no-reset", "optimizations.py",
      "self.ret[done] = 0.0", "self.ret[done] = self.ret[done]",
      "reward scaler's discounted return not reset at episode end"),
    M("reward-reset-on-termination-only", "engine/rollout.py",
      "buf.rewards[:, t] = pre.reward(r, ended)",
      "buf.rewards[:, t] = pre.reward(r, term)",
      "the rollout resets the reward scaler's return at termination only (not truncation)"),
    M("reward-scaler-gamma-fixed", "rollout.py",
      "RewardScaler(cfg.num_envs, cfg.gamma)", "RewardScaler(cfg.num_envs, 0.99)",
      "reward scaling ignores cfg.gamma"),
    M("reward-clip-before-scale", "rollout.py",
      "        if self.reward_scaler is not None:\n"
      "            out = self.reward_scaler(out, done, update=not self.statistics_frozen)\n"
      "        return clip_rewards(out, self.reward_clip)",
      "        out = clip_rewards(out, self.reward_clip)\n"
      "        if self.reward_scaler is not None:\n"
      "            out = self.reward_scaler(out, done, update=not self.statistics_frozen)\n"
      "        return out",
      "rewards clipped before scaling"),
    # --- observations -----------------------------------------------------------------------
    M("obs-stats-from-normalized", "rollout.py",
      "            if update and not self.statistics_frozen:\n"
      "                self.obs_norm.update(out)\n"
      "            out = self.obs_norm(out)",
      "            out = self.obs_norm(out)\n"
      "            if update and not self.statistics_frozen:\n"
      "                self.obs_norm.update(out)",
      "observation statistics updated with the normalized instead of the raw observation"),
    M("obs-stats-not-updated", "rollout.py",
      "                self.obs_norm.update(out)\n", "                pass\n",
      "observation statistics never updated"),
    # --- TRPO -------------------------------------------------------------------------------
    M("trpo-skip-kl-test", "algos/trpo.py",
      "            ok = ((seed_mean_kl(policy, old_policy, batch.obs) <= max_kl)\n"
      "                  & (surrogate() > surr_old) & ~accepted)",
      "            ok = ((surrogate() > surr_old) & ~accepted)",
      "TRPO line search skips the KL test"),
    M("trpo-skip-improvement-test", "algos/trpo.py",
      "            ok = ((seed_mean_kl(policy, old_policy, batch.obs) <= max_kl)\n"
      "                  & (surrogate() > surr_old) & ~accepted)",
      "            ok = ((seed_mean_kl(policy, old_policy, batch.obs) <= max_kl)\n"
      "                  & ~accepted)",
      "TRPO line search skips the improvement test"),
    M("cg-one-iteration", "algos/trpo.py",
      "conjugate_gradient(fisher_vector_product, g, cfg.cg_iters)",
      "conjugate_gradient(fisher_vector_product, g, 1)",
      "CG iterations ignored (1 iteration)"),
    M("cg-damping-ignored", "algos/trpo.py",
      "return side_by_side(product) + cfg.cg_damping * v",
      "return side_by_side(product)",
      "CG damping ignored"),
    M("trpo-step-not-scaled", "algos/trpo.py",
      "step = scale.unsqueeze(1) * direction",
      "step = direction",
      "TRPO step not scaled to max_kl"),
    M("fisher-whole-batch", "algos/trpo.py",
      "fisher_obs = torch.stack([b.obs[torch.randperm(len(b), generator=g)[:fisher_n]]\n"
      "                              for b, g in zip(batches, generators, strict=True)])",
      "fisher_obs = batch.obs",
      "Fisher on the whole batch (fisher_fraction ignored)"),
    M("fisher-head-subset", "algos/trpo.py",
      "fisher_obs = torch.stack([b.obs[torch.randperm(len(b), generator=g)[:fisher_n]]\n"
      "                              for b, g in zip(batches, generators, strict=True)])",
      "fisher_obs = batch.obs[:, :fisher_n]",
      "Fisher on the first states of the batch instead of a random subset"),
    M("backtrack-coef-fixed", "algos/trpo.py",
      "fraction = cfg.backtrack_coef ** k", "fraction = 0.5 ** k",
      "backtrack_coef ignored"),
    M("backtrack-iters-fixed", "algos/trpo.py",
      "for k in range(cfg.backtrack_iters):", "for k in range(10):",
      "backtrack_iters ignored (10 trials)"),
    M("trpo-adv-norm-always", "algos/trpo.py",
      "adv = normalize_advantages(batch.advantages, cfg.adv_norm)",
      "adv = normalize_advantages(batch.advantages, True)",
      "TRPO normalizes advantages even with adv_norm off"),
    M("rejected-step-kept", "algos/trpo.py",
      "nets.policy.set_flat(theta_new)  # a seed with no acceptable step keeps theta_old",
      "nets.policy.set_flat(torch.where(accepted.unsqueeze(1), theta_new, trial))",
      "a rejected line search keeps the last trial instead of theta_old"),
    M("trpo-value-grad-unclipped", "algos/trpo.py",
      "clip_gradients_per_seed(nets.value.flat_params, grad_limit)",
      "clip_gradients_per_seed(nets.value.flat_params, None)",
      "TRPO's value fit ignores grad_clip"),
    M("trpo-value-epochs-ignored", "algos/trpo.py",
      "    for _ in range(cfg.epochs):\n        for mb in seed_minibatches",
      "    for _ in range(1):\n        for mb in seed_minibatches",
      "TRPO's value fit runs one epoch"),
    # --- PPO --------------------------------------------------------------------------------
    M("ratio-swapped", "algos/ppo.py",
      "ratio = log_ratio(policy, dist, mb.actions, mb.logp).exp()",
      "ratio = (-log_ratio(policy, dist, mb.actions, mb.logp)).exp()",
      "PPO ratio computed old/new instead of new/old"),
    M("clip-eps-ignored", "algos/ppo.py",
      "clipped_surrogate_loss(ratio, adv, cfg.clip_eps)",
      "clipped_surrogate_loss(ratio, adv, 0.2)",
      "PPO clip range ignored (0.2 used)"),
    M("value-clip-around-targets", "algos/ppo.py",
      "value_loss(value_net(mb.obs), mb.values, mb.returns, value_clip)",
      "value_loss(value_net(mb.obs), mb.returns, mb.returns, value_clip)",
      "value clipping around the targets instead of the old values"),
    M("value-clip-range-fixed", "algos/ppo.py",
      "value_clip = cfg.value_clip_range if cfg.value_clip else None",
      "value_clip = 0.2 if cfg.value_clip else None",
      "value_clip_range ignored (0.2 used)"),
    M("epochs-ignored", "algos/ppo.py",
      "    for epoch in range(1, cfg.epochs + 1):\n", "    for epoch in range(1, 2):\n",
      "PPO epochs ignored (one epoch)"),
    M("permutation-not-refreshed", "engine/nets.py",
      "perm = torch.randperm(n, generator=generator)",
      "perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))",
      "the minibatch permutation is the same every epoch"),
    M("grad-clip-joint-norm", "algos/ppo.py",
      "            policy_grad_norm = clip_gradients_per_seed(nets.policy.flat_params, "
      "grad_limit)\n"
      "            value_grad_norm = clip_gradients_per_seed(nets.value.flat_params, grad_limit)\n",
      "            flats = (nets.policy.flat_params, nets.value.flat_params)\n"
      "            joint = torch.cat([f.grad for f in flats], 1).norm(dim=1)\n"
      "            policy_grad_norm = value_grad_norm = joint\n"
      "            if grad_limit is not None:\n"
      "                for f in flats:\n"
      "                    f.grad.mul_((grad_limit / (joint + 1e-6)).clamp(max=1.0)[:, None])\n",
      "policy and value gradients clipped by their joint norm"),
    M("max-grad-norm-fixed", "algos/ppo.py",
      "grad_limit = cfg.max_grad_norm if cfg.grad_clip else None",
      "grad_limit = 0.5 if cfg.grad_clip else None",
      "max_grad_norm ignored (0.5 used)"),
    M("ent-coef-fixed", "algos/ppo.py",
      "entropy_bonus(policy.entropy(dist), cfg.ent_coef)",
      "entropy_bonus(policy.entropy(dist), 0.01)",
      "ent_coef ignored (0.01 used)"),
    M("kl-target-fixed", "algos/ppo.py",
      "kl_early_stop(float(k), cfg.target_kl, cfg.kl_stop)",
      "kl_early_stop(float(k), 0.01, cfg.kl_stop)",
      "KL early stopping ignores target_kl"),
    M("kl-beta-not-adapted", "algos/ppo.py",
      'states[i]["kl_beta"] = adapt_kl_beta(betas[i], metrics["kl_mean"], cfg.target_kl)',
      'states[i]["kl_beta"] = betas[i]',
      "ppo-kl's beta never adapted"),
    M("kl-beta-init-ignored", "algos/ppo.py",
      'betas = [s.get("kl_beta", cfg.kl_beta_init) if penalty else 0.0 for s in states]',
      'betas = [s.get("kl_beta", 1.0) if penalty else 0.0 for s in states]',
      "kl_beta_init ignored"),
    M("kl-penalty-reversed", "algos/ppo.py",
      "beta * policy.kl(old_dist, dist).mean(-1)", "beta * policy.kl(dist, old_dist).mean(-1)",
      "ppo-kl's penalty is KL(new || old) instead of KL(old || new)"),
    M("adam-eps-fixed", "algos/common.py",
      "eps=cfg.adam_eps", "eps=1e-8",
      "adam_eps ignored"),
    # --- training loop, checkpoints, config ----------------------------------------------------
    M("lr-anneal-off-by-one", "train.py",
      "set_learning_rates(m.optimizer, m.cfg, it)",
      "set_learning_rates(m.optimizer, m.cfg, it + 1)",
      "lr annealing one iteration ahead"),
    M("ev-after-update", "train.py",
      "explained_variance=explained_variance(batch.values,\n"
      "                                                                    batch.returns),",
      "explained_variance=explained_variance(\n"
      "                                  m.agent.value_net(batch.obs).detach(), batch.returns),",
      "explained variance from the values predicted after the update"),
    M("heldout-kl-on-batch", "algos/common.py",
      "kl_h = policy.kl(old_policy.dist(heldout_obs), policy.dist(heldout_obs))",
      "kl_h = policy.kl(old_policy.dist(batch.obs), policy.dist(batch.obs))",
      "held-out KL computed on the training batch"),
    M("checkpoint-without-statistics", "run.py",
      '"preprocessor": agent.preprocessor.state_dict(),',
      '"preprocessor": type(agent.preprocessor)(cfg, agent.preprocessor.obs_shape)'
      ".state_dict(),",
      "the checkpoint saves fresh normalization statistics instead of the agent's"),
    M("update-rng-not-restored", "train.py",
      '            self.update_gen.set_state(ckpt["update_rng"])\n', "",
      "the update RNG is not restored on resume"),
    M("algo-state-not-restored", "train.py",
      'algo_state = dict(ckpt["algo_state"])', "algo_state = {}",
      "algo_state (ppo-kl beta) not restored on resume"),
    M("sample-rng-not-restored", "rollout.py",
      'self.rng.bit_generator.state = json.loads(state["sample_rng"])', "pass",
      "the sampling RNG is not restored on resume"),
    M("env-defaults-not-applied", "config.py",
      "        values.update(ENV_DEFAULTS[family])\n", "        pass\n",
      "the per-env default learning rates (and KL limit) are not applied"),
    M("update-seed-fixed", "train.py",
      "torch.Generator().manual_seed(cfg.seed + 1)", "torch.Generator().manual_seed(1)",
      "the update RNG ignores the seed"),
    # --- found by the generic mutation run (mutmut, docs/testing.md) ---------------------------
    M("fisher-at-least-two", "algos/trpo.py",
      "fisher_n = max(1, int(cfg.fisher_fraction * batch.pairs))",
      "fisher_n = max(2, int(cfg.fisher_fraction * batch.pairs))",
      "at least two Fisher states where fisher_fraction asks for fewer"),
    M("kl-stop-not-strict", "optimizations.py",
      "return enabled and mean_kl > 1.5 * target_kl",
      "return enabled and mean_kl >= 1.5 * target_kl",
      "KL early stopping fires at exactly 1.5 x target"),
    M("frozen-copy-without-reward-scaler", "rollout.py",
      'if "reward_scaler" in state:', 'if "reward_scaler" not in state:',
      "frozen statistics fail when reward scaling is off"),
    M("collector-exact-with-unsaved-envs", "rollout.py",
      "exact = bool(snapshots) and all(s is not None for s in snapshots)",
      "exact = bool(snapshots) or all(s is not None for s in snapshots)",
      "the collector claims exact env state when an env cannot be saved"),
    M("collector-restart-reported-exact", "rollout.py",
      '        if state["envs"] is None:\n            return False',
      '        if state["envs"] is None:\n            return True',
      "a resume that restarts the episodes reports them as continued"),
    M("head-index-refuses-one-env", "rollout.py",
      "        if self.num_envs < 1:\n            raise ValueError(\"head_index",
      "        if self.num_envs <= 1:\n            raise ValueError(\"head_index",
      "head_index refuses a one-env batch"),
    M("select-keeps-layout", "rollout.py",
      "getattr(self, f.name)[idx] for f in fields(self)\n"
      "                                 if f.name not in _NOT_PER_PAIR}\n"
      "        return Batch(**pairs, num_envs=0)",
      "getattr(self, f.name)[idx] for f in fields(self)\n"
      "                                 if f.name not in _NOT_PER_PAIR}\n"
      "        return Batch(**pairs, num_envs=1)",
      "a reordered batch claims the time-major layout"),
    # --- envs -------------------------------------------------------------------------------
    M("batch-step-float64-ctrl-cost", "envs/batch_step.py",
      "np.sum(np.square(self.actions), axis=1)",
      "np.sum(np.square(self.actions.astype(np.float64)), axis=1)",
      "the batch-stepped envs' control cost in float64 where the env's own is float32"),
    M("batch-step-time-limit-late", "envs/batch_step.py",
      "truncated[r] = limit._elapsed_steps >= limit._max_episode_steps",
      "truncated[r] = limit._elapsed_steps > limit._max_episode_steps",
      "the batch-stepped envs' time limit one step late"),
    M("batch-step-humanoid-contact-unclipped", "envs/batch_step.py",
      "np.square(got[\"cfrc_ext\"].reshape(n, -1)), axis=1), low, high)",
      "np.square(got[\"cfrc_ext\"].reshape(n, -1)), axis=1), -np.inf, np.inf)",
      "the batch-stepped Humanoid's contact cost not clipped to its contact cost range"),
    M("batch-step-humanoid-cinert-row0", "envs/batch_step.py",
      "(\"_include_cinert_in_observation\", \"cinert\", 1)",
      "(\"_include_cinert_in_observation\", \"cinert\", 0)",
      "the batch-stepped Humanoid observes cinert of the world body (row 0) too"),
    M("batch-step-humanoid-qfrc-free-joint", "envs/batch_step.py",
      "(\"_include_qfrc_actuator_in_observation\", \"qfrc_actuator\", 6)",
      "(\"_include_qfrc_actuator_in_observation\", \"qfrc_actuator\", 0)",
      "the batch-stepped Humanoid observes qfrc_actuator of the free joint too"),
    M("batch-step-humanoid-ctrl-cost-on-action", "envs/batch_step.py",
      "np.sum(np.square(got[\"ctrl\"]), axis=1)",
      "np.sum(np.square(frame.actions), axis=1)",
      "the batch-stepped Humanoid's control cost on the action (its dtype) instead of "
      "data.ctrl"),
    M("batch-step-humanoid-mass-centre-xpos", "envs/batch_step.py",
      "np.einsum(\"b,bj->j\", mass, env.data.xipos)",
      "np.einsum(\"b,bj->j\", mass, env.data.xpos)",
      "the batch-stepped Humanoid's mass centre from the body frames, not the centres "
      "of mass"),
    M("batch-step-ant-healthy-wrong-coordinate", "envs/batch_step.py",
      "_in_closed_range(qpos[:, 2], env._healthy_z_range)",
      "_in_closed_range(qpos[:, 1], env._healthy_z_range)",
      "the batch-stepped Ant's health check on y instead of z"),
    M("batch-step-ant-contact-cost-unclipped", "envs/batch_step.py",
      "np.sum(np.square(contact.reshape(n, -1)),",
      "np.sum(np.square(frame.gathered[\"cfrc_ext\"].reshape(n, -1)),",
      "the batch-stepped Ant's contact cost on the unclipped contact forces"),
    M("batch-step-ant-observes-unclipped", "envs/batch_step.py",
      "parts.append(contact[:, 1:].reshape(n, -1))",
      "parts.append(frame.gathered[\"cfrc_ext\"][:, 1:].reshape(n, -1))",
      "the batch-stepped Ant observes the unclipped contact forces"),
    M("batch-step-swimmer-excludes-x-only", "envs/batch_step.py",
      "SwimmerEnv: Planar(healthy=None, clip_velocity=False, excluded=2)",
      "SwimmerEnv: Planar(healthy=None, clip_velocity=False, excluded=1)",
      "the batch-stepped Swimmer leaves only x (not x and y) out of its observation"),
    # --- networks ---------------------------------------------------------------------------
    M("seed-batched-shared-log-std", "engine/stacked.py",
      "object.__setattr__(self.module, key, self.params[key].unsqueeze(1))",
      "object.__setattr__(self.module, key, self.params[key][:1].unsqueeze(1))",
      "the seed-batched networks give every seed seed 0's log_std"),
    # --- the engine: a seed's numbers must not depend on the other seeds ---------------------
    M("engine-neighbour-slice", "engine/nets.py",
      "rows = torch.arange(idx.shape[0]).unsqueeze(1)",
      "rows = ((torch.arange(idx.shape[0]) + 1) % idx.shape[0]).unsqueeze(1)",
      "the stacked batch gives seed i seed (i + 1) % N's pairs (no change for N = 1)"),
    M("engine-grad-norm-across-seeds", "engine/stacked.py",
      "norms = torch.linalg.vector_norm(grad, dim=1)",
      "norms = torch.linalg.vector_norm(grad, dim=(0, 1)).expand(grad.shape[0])",
      "per-seed gradient clipping uses one norm over all seeds' gradients together"),
    M("engine-adam-shared-step", "engine/adam.py",
      "bias2_sqrt, step_size = self.bias_corrections(group.steps, group.lr, data.dtype)",
      "bias2_sqrt, step_size = self.bias_corrections(\n"
      "                [group.steps[0]] * len(group.steps), group.lr, data.dtype)",
      "the masked Adam's bias corrections use seed 0's step count for every seed"),
    M("engine-adam-stopped-seed-steps", "engine/adam.py",
      "            for t, saved in kept:\n                t[rows] = saved\n",
      "            for t, saved in kept:\n                pass\n",
      "the masked Adam steps seeds outside the mask (a kl_stop'd seed keeps moving)"),
    M("engine-replaced-grad-unnoticed", "engine/stacked.py",
      "            if p.grad is not self._grads[k]:\n",
      "            if False:\n",
      "a parameter whose .grad was replaced is stepped with the (zero) flat gradient"),
    M("engine-phases-seed0-values", "engine/nets.py",
      "                phase.values[k] = list(v[steps, i])\n",
      "                phase.values[k] = list(v[steps, 0])\n",
      "every seed's phase means are seed 0's (no change for N = 1)"),
    M("robustness-compare-swapped", "study/robustness.py",
      "                             **compare_aucs(x, y, spec.statistics)))",
      "                             **compare_aucs(y, x, spec.statistics)))",
      "study robustness compares the baseline against the config (a and b swapped)"),
    M("robustness-effect-unpooled", "study/robustness.py",
      '            ref = g.loc[values == levels[0], "auc"].to_numpy(float)',
      '            ref = g.loc[values == levels[0], "auc"].to_numpy(float)[:2]',
      "a factor's main effect on the AUC compares with only part of its reference runs"),
    M("study-summary-no-robustness", "cli.py",
      "    if robustness is not None:\n",
      "    if robustness is None:\n",
      "pgscope study summary leaves out the study's robustness evaluation"),
    M("robustness-workers-misordered", "study/robustness.py",
      "            results = [f.result() for f in futures]  # in the order of the runs\n",
      "            results = [f.result() for f in futures][::-1]\n",
      "with several workers, study robustness files each run's results under another run"),
    M("probe-kinds-plugins-refused", "probes/__init__.py",
      "    _kinds(kind, (*builtin, *(n for n in _PROBES if n not in builtin)))\n",
      "    _kinds(kind, builtin)\n",
      "the config refuses a probe a plug-in registered (probe_kinds checked against the "
      "built-ins only)"),
    M("probe-kinds-unchecked", "probes/schedule.py",
      "        probes.check_kinds(cfg.probe_kinds)\n",
      "        pass\n",
      "a misspelt probe_kinds is accepted by the config (and fails only when probes run)"),
    M("trust-replay-checkpoint-lr", "probes/trust_region.py",
      "        set_learning_rates(optimizer, cfg, done)  # as the training loop does before it\n",
      "        pass\n",
      "the trust-region replay runs at the checkpoint's (previous update's) learning rate"),
    M("seeds-study-other-config", "study/spec.py",
      "        differ = sorted(k for k, v in cfg.to_dict().items() if k != \"seed\" "
      "and v != values[k])\n",
      "        differ: list[str] = []\n",
      "seed runs of different configs are read as one study (each labelled as the first)"),
    M("seeds-study-layout", "study/spec.py",
      "        if self.layout == \"seeds\":\n",
      "        if False:\n",
      "a --seeds study's runs are looked for at runs/<label>/<env>/seed_<s>"),
    M("unread-keys-include-own", "algos/__init__.py",
      "    return tuple(sorted(every - set(ALGORITHMS.get(name).reads)))",
      "    return tuple(sorted(every))",
      "the report calls keys the algorithm reads 'not read by' it"),
    M("eval-interval-from-the-wrong-end", "periodic_eval.py",
      'eval_return_low=finite(result["ci_low"]),',
      'eval_return_low=finite(result["mean_return"]),',
      "periodic evaluation logs the mean as the interval's low end"),
    M("eval-skips-last-iteration", "periodic_eval.py",
      "iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations)",
      "iteration % cfg.eval_every == 0)",
      "periodic evaluation skips the last iteration when eval_every does not divide it"),
    M("dr3-form-default-signed", "config.py",
      'value_dr3_form: str = field(default="abs"',
      'value_dr3_form: str = field(default="signed"',
      "the DR3 term's default form is the signed dot product"),
    M("reliability-cvar-upper-for-lower", "reliability.py",
      "            var = np.quantile(v, alpha, axis=ax, keepdims=True)\n",
      "            var = np.quantile(v, 1 - alpha, axis=ax, keepdims=True)\n",
      "the lower-tail CVaR (SRT, RR, RF) averages from the upper quantile"),
    M("sensitivity-threshold-relative-to-zero", "study/sensitivity.py",
      "    threshold = top - fraction * abs(top)",
      "    threshold = top - fraction",
      "the near-best threshold ignores the scale of the best score"),
    M("robustness-auc-right-endpoints", "robustness.py",
      "    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))",
      "    area = float(np.sum(np.diff(x) * y[1:]))",
      "the robustness AUC takes right endpoints instead of trapezoids"),
    M("tensorboard-step-off-by-one", "sinks.py",
      "            self.writer.add_scalar(tag, value, global_step=step)",
      "            self.writer.add_scalar(tag, value, global_step=step + 1)",
      "TensorBoard scalars (live and exported) one step late"),
    M("wandb-step-is-iteration", "sinks.py",
      "wrun.log(tagged_scalars(record), step=int(record[GLOBAL_STEP]))",
      'wrun.log(tagged_scalars(record), step=int(record["iteration"]))',
      "W&B logs at the iteration instead of env steps"),
    M("value-output-gain", "networks.py",
      "init_network(self.net, ortho_init, output_gain=1.0)",
      "init_network(self.net, ortho_init, output_gain=0.01)",
      "value net's output layer initialized with the policy's gain"),
    M("activation-ignored", "networks.py",
      "layers.append(activation(act)())", 'layers.append(activation("tanh")())',
      "the activation switch ignored (always tanh)"),
    M("init-log-std-ignored", "networks.py",
      "torch.full((act_dim,), float(init_log_std))", "torch.zeros(act_dim)",
      "init_log_std ignored"),
    # --- the one engine: the paths every run takes (sampling, single runs, invariance) -------
    M("engine-discrete-sampler-shared-rng", "engine/rollout.py",
      "uniform = np.stack([rng.random(logits.shape[1:]) for rng in rngs])",
      "uniform = np.stack([rngs[0].random(logits.shape[1:]) for rng in rngs])",
      "the categorical (Gumbel-max) sampler draws every seed's uniforms from seed 0's "
      "generator (no change for N = 1)"),
    M("engine-gaussian-sampler-shared-rng", "engine/rollout.py",
      "rng.standard_normal(dtype=np.float32, out=out)",
      "rngs[0].standard_normal(dtype=np.float32, out=out)",
      "the Gaussian sampler draws every seed's noise from seed 0's generator "
      "(no change for N = 1)"),
    M("engine-sampler-seed0-std", "engine/rollout.py",
      "std = np.stack([p.log_std.detach().exp().numpy()[None] for p in gaussian])",
      "std = np.stack([gaussian[0].log_std.detach().exp().numpy()[None] for p in gaussian])",
      "the rollout samples every seed's actions with seed 0's std (no change for N = 1)"),
    M("engine-final-obs-seed0-stats", "engine/lockstep.py",
      "out = (out - self.obs_stats.mean[seed]) / self._obs_scale[seed]",
      "out = (out - self.obs_stats.mean[0]) / self._obs_scale[0]",
      "a truncated episode's final observation normalized with seed 0's statistics "
      "(no change for N = 1)"),
    M("train-returns-on-failure", "train.py",
      "            raise self.exception\n        return self.path",
      "            pass\n        return self.path",
      "train() (BatchMember.result) returns the run directory of a diverged or failed "
      "single run instead of raising its exception"),
    M("engine-env-divergence-recorded-as-failure", "train.py",
      "                if isinstance(result, DivergenceError):\n"
      "                    gone[m.index] = m.diverged(result, it + 1)\n"
      "                elif isinstance(result, Exception):\n"
      "                    gone[m.index] = m.end(\"failed\", "
      "f\"{type(result).__name__}: {result}\", result)\n",
      "                if isinstance(result, Exception):\n"
      "                    gone[m.index] = m.end(\"failed\", "
      "f\"{type(result).__name__}: {result}\", result)\n"
      "                elif isinstance(result, DivergenceError):\n"
      "                    gone[m.index] = m.diverged(result, it + 1)\n",
      "a seed whose env turns non-finite during the rollout ends 'failed' instead of "
      "'diverged' (branches in the wrong order)"),
    M("one-output-matmul", "networks.py",
      "return (x * weight).sum(-1, keepdim=True) + bias",
      "return x @ weight.transpose(-1, -2) + bias",
      "one-output layers as a matrix product, whose kernel differs alone and in a batch "
      "(a seed's bits depend on N)"),
    M("adv-norm-torch-std", "optimizations.py",
      "std = (centered.square().sum(-1, keepdim=True) / (m - 1)).sqrt()",
      "std = adv.std(-1, keepdim=True)",
      "advantage std by Tensor.std, whose float64 kernel reduces one row differently "
      "from several"),
    M("update-one-drops-heldout", "algos/__init__.py",
      "[heldout_obs], each)[0]", "[None], each)[0]",
      "update_one ignores heldout_obs (no held-out KL)"),
    M("update-one-drops-epoch-callback", "algos/__init__.py",
      "[heldout_obs], each)[0]", "[heldout_obs], None)[0]",
      "update_one never calls epoch_callback (the trust-region probe sees no epoch)"),
    M("check-config-skips-algo-check", "algos/__init__.py",
      "    if check is not None:\n        check(cfg)",
      "    if check is not None:\n        pass",
      "the registry's config check does not call the algorithm's own check"),
    M("trpo-plus-paper-schedule", "algos/paper.py",
      "        max_kl_final=0.0,\n",
      "        max_kl_final=ByEnv(Hopper=0.07, Walker2d=0.04, Humanoid=0.05),\n",
      "trpo+-paper runs the KL schedule of the config files, not the constant limit "
      "the authors' code ran"),
]


def _check_unique_names() -> None:
    names = [m.name for m in MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"duplicate mutant names: {sorted(dupes)}")


def check_patterns(mutants: list[Mutant], src: Path) -> list[str]:
    """One message per mutant whose pattern does not occur exactly once in ``src``."""
    problems = []
    for m in mutants:
        path = src / "pgscope" / m.file
        if not path.exists():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: pattern occurs {count} times in {m.file} "
                            f"(must be exactly once): {m.old!r}")
    return problems


def test_selection() -> list[str]:
    return FAST_TESTS + [t for t in OPTIONAL_TESTS if (ROOT / t).exists()]


# --- the sandbox: a copy of src/ and tests/ and an interpreter that imports the copy ----------
class Sandbox:
    """A temporary copy of the repository's sources and an interpreter environment whose
    ``pgscope`` is that copy. One per worker; refreshed for every mutant."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.src = base / "src"
        self.env = base / "env"
        venv.EnvBuilder(with_pip=False, symlinks=True).create(self.env)
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(self.env),
                                                            "platbase": str(self.env)}))
        deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
        lines = [str(self.src)] + [f"import site; site.addsitedir({p!r})" for p in deps]
        (purelib / "00_pgscope_mutant.pth").write_text("\n".join(lines) + "\n")
        self.python = self.env / "bin" / "python"

    def refresh(self, mutant: Mutant | None) -> None:
        for name in COPIED:
            shutil.rmtree(self.dir / name, ignore_errors=True)
            shutil.copytree(ROOT / name, self.dir / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(ROOT / "pyproject.toml", self.dir / "pyproject.toml")
        if mutant is not None:
            apply(mutant, self.src)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(PYTHONPATH=str(self.src), PYTHONDONTWRITEBYTECODE="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    def pytest(self, tests: list[str], timeout: float = TIMEOUT_S
               ) -> tuple[str, str | None, float]:
        """Run the selection; (status, first failing test, seconds), status one of
        passed / failed / timeout."""
        start = time.perf_counter()
        try:
            proc = subprocess.run([str(self.python), "-m", "pytest", *PYTEST_ARGS, *tests],
                                  cwd=self.dir, env=self.environ(), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", None, time.perf_counter() - start
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
            return "passed", None, seconds
        return "failed", first_failure(proc.stdout + proc.stderr, proc.returncode), seconds

    def python_output(self, code: str, extra_env: dict[str, str] | None = None) -> str:
        env = self.environ()
        env.update(extra_env or {})
        return subprocess.run([str(self.python), "-c", code], cwd=self.dir, env=env,
                              capture_output=True, text=True, timeout=120).stdout.strip()


def apply(mutant: Mutant, src: Path) -> None:
    path = src / "pgscope" / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise RuntimeError(f"{mutant.name}: pattern occurs {count} times in {mutant.file}")
    path.write_text(text.replace(mutant.old, mutant.new))


def first_failure(output: str, returncode: int) -> str:
    """The first FAILED/ERROR node id in pytest's short summary (or a hint)."""
    for line in output.splitlines():
        m = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    return f"(pytest exit {returncode}, no test named)"


# --- checks that the sandbox really imports the copy -----------------------------------------
SENTINEL = Mutant("import-sentinel", "__init__.py", '__version__ = "',
                  'raise RuntimeError("mutant sentinel")\n__version__ = "',
                  "raises at import (set-up check)")


def setup_checks(box: Sandbox, baseline: bool, tests: list[str]) -> list[str]:
    """Return problems: the copy must be what the tests and their subprocesses import, a
    mutant that raises at import must be seen, and the unmutated selection must pass."""
    problems = []
    box.refresh(None)
    where = box.python_output("import pgscope; print(pgscope.__file__)")
    if not where.startswith(str(box.src)):
        problems.append(f"the sandbox imports pgscope from {where!r}, not the copy")
    # a subprocess that sets its own PYTHONPATH (as tests/test_train.py's kill -9 test does)
    code = ("import os, subprocess, sys; env = dict(os.environ, PYTHONPATH='tests'); "
            "print(subprocess.run([sys.executable, '-c', 'import pgscope; "
            "print(pgscope.__file__)'], env=env, capture_output=True, text=True).stdout)")
    where = box.python_output(code)
    if not where.startswith(str(box.src)):
        problems.append(f"a subprocess with its own PYTHONPATH imports pgscope from {where!r}")
    box.refresh(SENTINEL)
    status, test, _ = box.pytest(tests[:1], timeout=300)
    if status != "failed":
        problems.append("a mutant that raises at import was not seen (the tests passed)")
    if baseline:
        box.refresh(None)
        status, test, seconds = box.pytest(tests)
        print(f"baseline (no mutant): {status} in {seconds:.1f} s", flush=True)
        if status != "passed":
            problems.append(f"the unmutated selection does not pass ({status}: {test})")
    return problems


# --- running and reporting --------------------------------------------------------------------
@dataclass
class Result:
    mutant: Mutant
    status: str  # killed / survived / timeout (counted as killed) / error (pattern gone)
    test: str | None
    seconds: float


def run_all(mutants: list[Mutant], jobs: int, baseline: bool, tests: list[str]
            ) -> tuple[list[Result], float | None]:
    with tempfile.TemporaryDirectory(prefix="pgscope-mutants-") as tmp:
        boxes: queue.Queue[Sandbox] = queue.Queue()
        for i in range(jobs):
            boxes.put(Sandbox(Path(tmp) / f"w{i}"))
        box = boxes.get()
        t0 = time.perf_counter()
        problems = setup_checks(box, baseline, tests)
        boxes.put(box)
        if problems:
            for p in problems:
                print(f"set-up check failed: {p}", file=sys.stderr)
            raise SystemExit(2)
        print(f"set-up checks passed ({time.perf_counter() - t0:.1f} s): the tests and their "
              "subprocesses import the copy; an import-time failure is seen", flush=True)
        lock = threading.Lock()

        def one(m: Mutant) -> Result:
            box = boxes.get()
            try:
                box.refresh(m)
                status, test, seconds = box.pytest(tests)
            except RuntimeError as exc:  # the source changed under us: the pattern is gone
                status, test, seconds = "error", str(exc), 0.0
            finally:
                boxes.put(box)
            result = Result(m, {"failed": "killed", "passed": "survived"}.get(status, status),
                            test, seconds)
            with lock:
                print(f"{result.status:9s} {m.name:34s} {seconds:6.1f} s  {test or ''}",
                      flush=True)
            return result

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, mutants))
        return results, time.perf_counter() - start


def table(results: list[Result]) -> str:
    rows = ["| mutant | what it plants | result | first failing test | s |",
            "|---|---|---|---|---|"]
    for r in results:
        test = f"`{r.test}`" if r.test else "-"
        rows.append(f"| `{r.mutant.name}` | {r.mutant.description} ({r.mutant.file}) | "
                    f"{r.status} | {test} | {r.seconds:.1f} |")
    return "\n".join(rows)


def machine() -> str:
    try:
        import torch  # noqa: PLC0415 - only for the report

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "?"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch_version}")


def write_docs(results: list[Result], seconds: float, jobs: int, tests: list[str],
               argv: list[str]) -> None:
    killed = sum(r.status in ("killed", "timeout") for r in results)
    command = "python tools/mutants.py " + " ".join(argv)
    section = "\n".join([
        BEGIN,
        "## Curated mutants (`make mutants`)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{command.strip()}` ({jobs} job{'s' if jobs > 1 else ''})",
        f"- machine: {machine()}",
        f"- selection: {', '.join(f'`{t}`' for t in tests)} "
        f"(`pytest {' '.join(PYTEST_ARGS)}`)",
        f"- result: {killed} of {len(results)} killed, "
        f"{len(results) - killed} survived; {seconds / 60:.1f} min in all",
        "",
        table(results),
        END,
    ])
    text = DOCS.read_text() if DOCS.exists() else "# Testing\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)
    print(f"wrote {DOCS.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="parallel workers (default 1)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not run the unmutated selection first")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the result table into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    _check_unique_names()

    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.file:20s} {m.description}")
        return 0
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    problems = check_patterns(mutants, ROOT / "src")
    if problems:
        print("patterns that do not match exactly once (the source drifted; update them):",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    tests = test_selection()
    print(f"{len(mutants)} mutants, selection: {' '.join(tests)}", flush=True)
    results, seconds = run_all(mutants, max(1, args.jobs), not args.skip_baseline, tests)
    print()
    print(table(results))
    survived = [r.mutant.name for r in results if r.status in ("survived", "error")]
    print(f"\n{len(results) - len(survived)} of {len(results)} killed in {seconds:.0f} s"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    if args.write_docs:
        write_docs(results, seconds, max(1, args.jobs), tests,
                   argv if argv is not None else sys.argv[1:])
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
