"""The metric registry: every key of a run's ``metrics.jsonl``, defined once.

Each per-iteration key means the same thing for every algorithm that logs it. A
:class:`Metric` says what the number is (over which samples, before or after the update),
its unit, which algorithms log it and under which condition, whether it is a wall-clock
timing (excluded from determinism checks) and the names users may search for it under.

``docs/metrics.md`` is generated from this registry::

    .venv/bin/python -m pgscope.metrics > docs/metrics.md

and ``tests/test_metrics_registry.py`` checks both that the file is current and that real
training runs of every algorithm log exactly the keys the registry promises.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("ppo", "trpo")

#: Machine-readable conditions a metric may require (see :func:`metrics_for`).
REQUIREMENTS = {
    "discrete": "discrete (categorical) action spaces only",
    "gaussian": "continuous (Gaussian) action spaces only",
    "ppo-kl": "the adaptive-KL-penalty loss only (ppo_loss = kl, preset ppo-kl)",
    "heldout": "from the second iteration on, when heldout_kl is on",
}

GROUPS = (
    "Run progress and episodes",
    "Policy update",
    "Policy change (after the update)",
    "Data-collecting policy",
    "Value function",
    "Timing",
)


@dataclass(frozen=True)
class Metric:
    """One per-iteration key of ``metrics.jsonl``.

    ``requires`` holds the machine-readable conditions (keys of :data:`REQUIREMENTS`) under
    which the key is logged, ``condition`` says the same in words. ``legacy`` names the key
    that metrics files written before the one-meaning-per-metric change carry in its place
    (the closest older quantity; readers such as the trust-region probe fall back to it).
    """

    name: str
    meaning: str
    unit: str
    algorithms: tuple[str, ...]
    group: str
    condition: str = ""
    requires: tuple[str, ...] = ()
    timing: bool = False
    aliases: tuple[str, ...] = ()
    legacy: str = ""

    def logged(self, algo: str, *, discrete: bool | None = None, ppo_loss: str | None = None,
               heldout: bool | None = None) -> bool:
        """Whether ``algo`` logs this key in the given setting; a setting left ``None``
        counts as satisfying every condition that depends on it ("may be logged")."""
        if algo not in self.algorithms:
            return False
        checks = {
            "discrete": discrete is None or discrete,
            "gaussian": discrete is None or not discrete,
            "ppo-kl": ppo_loss is None or ppo_loss == "kl",
            "heldout": heldout is None or heldout,
        }
        return all(checks[r] for r in self.requires)


PPO, TRPO, BOTH = ("ppo",), ("trpo",), ALGORITHMS
_RUN, _UPDATE, _CHANGE, _POLICY, _VALUE, _TIME = GROUPS
_EPS_REF = ("eps_ref = clip_eps for the clipped PPO loss with clip_eps < 1 (ppo, ppo-m), "
            "else the nominal 0.2 (ppo-noclip, ppo-kl, trpo)")

METRICS: tuple[Metric, ...] = (
    # --- run progress and episodes ----------------------------------------------------
    Metric("iteration", "Number of this iteration, counting from 1 (one line per "
           "iteration).", "iterations", BOTH, _RUN, aliases=("time/iterations",)),
    Metric("env_steps", "Env steps sampled so far, summed over the parallel envs, this "
           "iteration's batch included.", "env steps", BOTH, _RUN,
           aliases=("time/total_timesteps", "global_step")),
    Metric("return_mean", "Mean undiscounted return of the episodes that ended during this "
           "iteration's rollout (episodes may have started in earlier iterations), in the "
           "env's own reward units: before reward_multiplier, scaling and clipping. Null "
           "when no episode ended.", "return (env units)", BOTH, _RUN,
           aliases=("rollout/ep_rew_mean", "charts/episodic_return")),
    Metric("return_min", "Smallest return among the episodes that ended during this "
           "iteration's rollout (as return_mean); null when none ended.",
           "return (env units)", BOTH, _RUN),
    Metric("return_max", "Largest return among the episodes that ended during this "
           "iteration's rollout (as return_mean); null when none ended.",
           "return (env units)", BOTH, _RUN),
    Metric("episodes", "Number of episodes that ended (terminated or truncated) during this "
           "iteration's rollout.", "episodes", BOTH, _RUN),
    Metric("episode_length", "Mean length of the episodes that ended during this "
           "iteration's rollout; null when none ended.", "env steps", BOTH, _RUN,
           aliases=("rollout/ep_len_mean", "charts/episodic_length")),
    # --- the policy update --------------------------------------------------------------
    Metric("policy_loss", "Mean, over the update's policy-gradient evaluations, of the "
           "policy loss whose gradient was taken, entropy bonus excluded. PPO clip: per "
           "minibatch -mean(min(r A, clip(r, 1-eps, 1+eps) A)); ppo-kl: -mean(r A) + "
           "beta mean KL(old || new); TRPO: its one full-batch surrogate loss -mean(r A) "
           "at theta_old.", "loss", BOTH, _UPDATE,
           aliases=("train/policy_gradient_loss", "losses/policy_loss")),
    Metric("policy_grad_norm", "L2 norm, before gradient clipping, of the gradient of "
           "(policy_loss - entropy bonus) with respect to the policy parameters; mean over "
           "the same evaluations as policy_loss (PPO: each minibatch; TRPO: its one "
           "full-batch gradient).", "gradient norm", BOTH, _UPDATE,
           aliases=("grad_norm",), legacy="grad_norm"),
    Metric("ratio_max", "Largest probability ratio pi_theta(a|s) / pi_old(a|s) over every "
           "minibatch of every epoch, each evaluated before that minibatch's step.",
           "ratio", PPO, _UPDATE),
    Metric("ratio_min", "Smallest probability ratio pi_theta / pi_old over every minibatch "
           "of every epoch, each evaluated before that minibatch's step.", "ratio", PPO,
           _UPDATE),
    Metric("clip_fraction", "Fraction of the probability ratios of every minibatch of every "
           "epoch (each evaluated before that minibatch's step) with |r - 1| > eps_ref; "
           + _EPS_REF + ".", "fraction", PPO, _UPDATE,
           aliases=("train/clip_fraction", "losses/clipfrac")),
    Metric("ratio_first_minibatch_dev", "max |r - 1| of the ratios at the update's first "
           "loss evaluation (PPO: the first minibatch of the first epoch; TRPO: the full "
           "batch at theta_old). The policy has not moved yet, so it must be 0: a bug "
           "detector for stale log-probabilities.", "ratio", BOTH, _UPDATE),
    Metric("epochs_run", "Policy epochs completed in this update: epochs, or fewer when "
           "kl_stop stopped early (the epoch whose KL exceeded 1.5 x target_kl counts).",
           "epochs", PPO, _UPDATE),
    Metric("kl_beta", "The KL-penalty coefficient beta used in this update (it is adapted "
           "for the next one from kl_mean).", "1", PPO, _UPDATE, condition="ppo-kl only",
           requires=("ppo-kl",)),
    Metric("lr", "The policy's Adam learning rate used in this iteration, after annealing "
           "(lr_anneal: policy_lr x (1 - (iteration - 1) / iterations)).", "learning rate",
           PPO, _UPDATE, aliases=("learning_rate", "train/learning_rate",
                                   "charts/learning_rate"), legacy="learning_rate"),
    Metric("step_fraction", "Accepted fraction of the full natural-gradient step "
           "(backtrack_coef ** k for the accepted trial k), 0 when the line search "
           "rejected every trial.", "fraction", TRPO, _UPDATE),
    Metric("linesearch_steps", "Line-search trials made: the index (from 1) of the accepted "
           "trial, or backtrack_iters when none was accepted.", "trials", TRPO, _UPDATE),
    Metric("step_norm", "L2 norm of the accepted change of the policy parameters (0 when "
           "no step was accepted).", "parameter norm", TRPO, _UPDATE),
    # --- how far the policy moved ---------------------------------------------------------
    Metric("ratio_max_after", "Largest probability ratio pi_new(a|s) / pi_old(a|s) over the "
           "whole training batch after the update (the trust-region comparison across "
           "algorithms).", "ratio", BOTH, _CHANGE, legacy="ratio_max"),
    Metric("ratio_min_after", "Smallest probability ratio pi_new / pi_old over the whole "
           "training batch after the update.", "ratio", BOTH, _CHANGE, legacy="ratio_min"),
    Metric("clip_fraction_after", "Fraction of the whole training batch whose ratio "
           "pi_new / pi_old after the update has |r - 1| > eps_ref; " + _EPS_REF + ".",
           "fraction", BOTH, _CHANGE, legacy="clip_fraction"),
    Metric("kl_mean", "Mean over the training batch's states of the analytic KL(old || "
           "new) between the data-collecting policy and the updated policy.", "nats",
           BOTH, _CHANGE),
    Metric("kl_max", "Largest analytic KL(old || new) over the training batch's states, "
           "after the update.", "nats", BOTH, _CHANGE),
    Metric("kl_heldout_mean", "Mean analytic KL(old || new) after the update on the states "
           "of the previous iteration's batch (states this update did not train on).",
           "nats", BOTH, _CHANGE, condition="from iteration 2, when heldout_kl",
           requires=("heldout",)),
    Metric("kl_heldout_max", "Largest analytic KL(old || new) after the update on the "
           "previous iteration's states.", "nats", BOTH, _CHANGE,
           condition="from iteration 2, when heldout_kl", requires=("heldout",)),
    Metric("approx_kl", "The k3 estimator mean((r - 1) - log r) of KL(old || new), with r = "
           "pi_new / pi_old of the batch actions after the update.", "nats", BOTH, _CHANGE,
           aliases=("kl_k3", "train/approx_kl", "losses/approx_kl"), legacy="kl_k3"),
    # --- the policy that collected the batch ----------------------------------------------
    Metric("entropy", "Mean entropy of the data-collecting policy (before the update) over "
           "the batch states.", "nats", BOTH, _POLICY, aliases=("losses/entropy",)),
    Metric("entropy_frac", "entropy / log(number of actions): the data-collecting policy's "
           "entropy as a fraction of the uniform policy's (null with a single action).",
           "fraction", BOTH, _POLICY, condition="discrete actions only",
           requires=("discrete",)),
    Metric("policy_std", "Mean over action dimensions of exp(log_std) of the "
           "data-collecting policy (before the update).", "action units", BOTH, _POLICY,
           condition="Gaussian policies only", requires=("gaussian",),
           aliases=("train/std",)),
    Metric("action_saturation", "Fraction of the action components sampled in this "
           "iteration's rollout that lie outside the action space's bounds (the env gets "
           "them clipped to the bound when action_clip is on): near 1, the policy acts at "
           "the bounds almost always.", "fraction", BOTH, _POLICY,
           condition="Gaussian policies only", requires=("gaussian",)),
    # --- the value function -------------------------------------------------------------
    Metric("value_loss", "Mean over the value net's gradient steps (every minibatch of every "
           "epoch) of the value loss, the clipped one when value_clip is on.", "loss",
           BOTH, _VALUE, aliases=("train/value_loss", "losses/value_loss")),
    Metric("value_grad_norm", "Mean over the value net's gradient steps of the L2 norm, "
           "before gradient clipping, of the value loss's gradient with respect to the "
           "value parameters.", "gradient norm", BOTH, _VALUE),
    Metric("explained_variance", "1 - Var(R - V) / Var(R) over the training batch, with R "
           "the value targets (GAE returns) and V the values predicted before the update; "
           "null when R is constant.", "1", BOTH, _VALUE,
           aliases=("train/explained_variance", "losses/explained_variance")),
    Metric("value_target_absmax", "Largest |R| over the training batch of the value "
           "targets R (GAE returns), in the reward units the value net learns (after "
           "reward_multiplier, scaling and clipping).", "return (learner units)", BOTH,
           _VALUE),
    Metric("advantage_absmax", "Largest |A| over the training batch of the GAE advantages, "
           "in the reward units the value net learns, before any advantage normalization.",
           "return (learner units)", BOTH, _VALUE),
    Metric("value_lr", "The value net's Adam learning rate used in this iteration, after "
           "annealing (lr_anneal: value_lr x (1 - (iteration - 1) / iterations)).",
           "learning rate", BOTH, _VALUE),
    # --- wall-clock timing (excluded from determinism checks) ----------------------------
    Metric("sps", "Env steps of this iteration per wall-clock second of its rollout and "
           "update.", "env steps / second", BOTH, _TIME, timing=True,
           aliases=("time/fps", "charts/SPS")),
    Metric("rollout_s", "Wall-clock seconds spent sampling this iteration's batch.",
           "seconds", BOTH, _TIME, timing=True),
    Metric("update_s", "Wall-clock seconds spent in this iteration's update (policy, value "
           "net and the update's metrics).", "seconds", BOTH, _TIME, timing=True),
    Metric("time_elapsed", "Wall-clock seconds of rollouts and updates summed over all "
           "iterations so far, across resumes (checkpointing and probes not included).",
           "seconds", BOTH, _TIME, timing=True, aliases=("time/time_elapsed",)),
)

#: The registry by key.
REGISTRY: dict[str, Metric] = {m.name: m for m in METRICS}

#: Metrics that measure wall-clock time, excluded from determinism checks.
TIMING_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS if m.timing)


def metrics_for(algo: str, *, discrete: bool | None = None, ppo_loss: str | None = None,
                heldout: bool | None = None) -> tuple[Metric, ...]:
    """The metrics ``algo`` logs, in registry order.

    ``discrete`` selects the action space, ``ppo_loss`` the PPO loss (``"clip"`` or
    ``"kl"``) and ``heldout`` whether this iteration has held-out states (``heldout_kl`` on
    and iteration >= 2). A setting left ``None`` keeps the metrics whose condition depends
    on it, so ``metrics_for("ppo")`` lists every key PPO may log.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {ALGORITHMS}")
    return tuple(m for m in METRICS
                 if m.logged(algo, discrete=discrete, ppo_loss=ppo_loss, heldout=heldout))


def metric_value(record: Mapping[str, Any], name: str) -> Any:
    """``record[name]``, or, for a metrics line written before the one-meaning-per-metric
    change, the value of the metric's ``legacy`` key; ``None`` when neither is there."""
    if name in record:
        return record[name]
    legacy = REGISTRY[name].legacy
    return record.get(legacy) if legacy else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The registry as the Markdown of ``docs/metrics.md``."""
    lines = [
        "<!-- Generated from src/pgscope/metrics.py by "
        "`.venv/bin/python -m pgscope.metrics > docs/metrics.md`; do not edit by hand "
        "(tests/test_metrics_registry.py checks that it is current). -->",
        "",
        "# Metrics",
        "",
        "Every training iteration appends one JSON line to `RUN/metrics.jsonl`. Each key "
        "below means the same thing for every algorithm that logs it; a key an algorithm "
        "does not log is absent from its lines (not null). Values that cannot be computed "
        "(no episode ended, constant targets, NaN) are written as null.",
        "",
        "Notation: the update starts from the data-collecting policy pi_old (parameters "
        "theta_old) and ends at pi_new; r = pi(a|s) / pi_old(a|s) for a batch action a, "
        "A the advantage (normalized per minibatch when adv_norm is on). \"Also known "
        "as\" lists the names other libraries or older pgscope versions use for the "
        "closest quantity (stable-baselines3: `train/...`, `rollout/...`, `time/...`; "
        "CleanRL: `losses/...`, `charts/...`); those may be computed differently, the "
        "meaning here is what pgscope logs. Timing keys are wall-clock measurements and "
        "are excluded from determinism checks (`pgscope.metrics.TIMING_KEYS`).",
        "",
        "Metrics files written before this registry used other keys: `grad_norm` (now "
        "`policy_grad_norm`), `kl_k3` (now `approx_kl`), `learning_rate` (now `lr`, PPO "
        "only), and TRPO logged `ratio_max`, `ratio_min` and `clip_fraction` pooled over "
        "the ratios before (all 1) and after its step. Readers fall back to the old key "
        "where the table names one (`pgscope.metrics.metric_value`).",
    ]
    for group in GROUPS:
        lines += ["", f"## {group}", "",
                  "| key | meaning | unit | logged by | when | also known as |",
                  "|---|---|---|---|---|---|"]
        for m in METRICS:
            if m.group != group:
                continue
            meaning = m.meaning
            if m.legacy:
                meaning += f" Older files: `{m.legacy}`."
            aliases = ", ".join(f"`{a}`" for a in m.aliases)
            lines.append(f"| `{m.name}` | {_cell(meaning)} | {m.unit} | "
                         f"{', '.join(m.algorithms)} | {_cell(m.condition or 'always')} | "
                         f"{aliases} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m pgscope.metrics`` (see ``__main__.py``): print docs/metrics.md."""
    sys.stdout.write(render_markdown())
