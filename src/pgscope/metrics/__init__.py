"""The metric registry: every key of a run's ``metrics.jsonl``, defined once.

Each per-iteration key means the same thing for every algorithm that logs it. A
:class:`Metric` says what the number is (over which samples, before or after the update),
its unit, under which condition it is logged, whether it is a wall-clock timing (excluded
from determinism checks), the names users may search for it under and its TensorBoard
tag. Which algorithms log it comes from the algorithm registry (:mod:`pgscope.algos`):
the training loop's own keys are logged for every algorithm (``every_algorithm``), the
others by the algorithms that list them in their ``logs``.

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

#: Machine-readable conditions a metric may require (see :func:`metrics_for`).
REQUIREMENTS = {
    "discrete": "discrete (categorical) action spaces only",
    "gaussian": "continuous (Gaussian) action spaces only",
    "ppo-kl": "the adaptive-KL-penalty loss only (ppo_loss = kl, preset ppo-kl)",
    "heldout": "from the second iteration on, when heldout_kl is on",
    "features": "every features_every-th iteration, when features_every > 0",
    "eval": "every eval_every-th iteration and the last one, when eval_every > 0",
}

GROUPS = (
    "Run progress and episodes",
    "Policy update",
    "Policy change (after the update)",
    "Data-collecting policy",
    "Value function",
    "Evaluation",
    "Timing",
)


@dataclass(frozen=True)
class Metric:
    """One per-iteration key of ``metrics.jsonl``.

    ``every_algorithm`` marks the keys the training loop logs for every algorithm; any
    other key is logged by the algorithms that list it (:attr:`algorithms`). ``requires``
    holds the machine-readable conditions (keys of :data:`REQUIREMENTS`) under which the
    key is logged, ``condition`` says the same in words. ``legacy`` names the key that
    metrics files written before the one-meaning-per-metric change carry in its place (the
    closest older quantity; readers such as the trust-region probe fall back to it).
    ``tensorboard`` is the tag the TensorBoard sink writes the value under, times
    ``tensorboard_scale`` (the stable-baselines3 name where SB3 logs the same quantity;
    else ``pgscope/<name>``, see :func:`tensorboard_tag`).
    """

    name: str
    meaning: str
    unit: str
    group: str
    every_algorithm: bool = False
    condition: str = ""
    requires: tuple[str, ...] = ()
    timing: bool = False
    aliases: tuple[str, ...] = ()
    legacy: str = ""
    tensorboard: str = ""
    tensorboard_scale: float = 1.0

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The registered algorithms that log this key (under its condition)."""
        from pgscope.algos import ALGORITHMS

        return tuple(a.name for a in ALGORITHMS.values()
                     if self.every_algorithm or self.name in a.logs)

    def logged(self, algo: str, *, discrete: bool | None = None, ppo_loss: str | None = None,
               heldout: bool | None = None, features: bool | None = None,
               evaluation: bool | None = None) -> bool:
        """Whether ``algo`` logs this key in the given setting; a setting left ``None``
        counts as satisfying every condition that depends on it ("may be logged")."""
        if algo not in self.algorithms:
            return False
        checks = {
            "discrete": discrete is None or discrete,
            "gaussian": discrete is None or not discrete,
            "ppo-kl": ppo_loss is None or ppo_loss == "kl",
            "heldout": heldout is None or heldout,
            "features": features is None or features,
            "eval": evaluation is None or evaluation,
        }
        return all(checks[r] for r in self.requires)


_RUN, _UPDATE, _CHANGE, _POLICY, _VALUE, _EVAL, _TIME = GROUPS
#: ``every_algorithm=EVERY``: a key the training loop logs whatever the algorithm.
EVERY = True
#: The conditions shared by several keys (words and tags, see Metric).
_HELDOUT: dict[str, Any] = dict(condition="from iteration 2, when heldout_kl",
                                requires=("heldout",))
_GAUSSIAN: dict[str, Any] = dict(condition="Gaussian policies only", requires=("gaussian",))
_FEATURES: dict[str, Any] = dict(condition="every features_every-th iteration (default: every)",
                                 requires=("features",))
_EVALUATED: dict[str, Any] = dict(condition="every eval_every-th iteration and the last "
                                  "one, when eval_every > 0", requires=("eval",))
_EVAL_EPISODES = ("eval_episodes fresh episodes on separate envs (seeds eval_seed, eval_seed "
                  "+ 1, ...) with the policy after this iteration's update and its "
                  "observation statistics frozen: the mean action when eval_deterministic "
                  "(as pgscope evaluate), else sampled actions")
_PHI = ("phi(s) = the value net's penultimate activations (ValueNet.features), after this "
        "iteration's update, on the training batch's states; ")
_EPS_REF = ("eps_ref = clip_eps for the clipped PPO loss with clip_eps < 1 (ppo, ppo-m), "
            "else the nominal 0.2 (every other preset)")

METRICS: tuple[Metric, ...] = (
    # --- run progress and episodes ----------------------------------------------------
    Metric("iteration", "Number of this iteration, counting from 1 (one line per "
           "iteration).", "iterations", _RUN, every_algorithm=EVERY,
           aliases=("time/iterations",),
           tensorboard="time/iterations"),
    Metric("env_steps", "Env steps sampled so far, summed over the parallel envs, this "
           "iteration's batch included.", "env steps", _RUN, every_algorithm=EVERY,
           aliases=("time/total_timesteps", "global_step")),
    Metric("return_mean", "Mean undiscounted return of the episodes that ended during this "
           "iteration's rollout (episodes may have started in earlier iterations), in the "
           "env's own reward units: before reward_multiplier, scaling and clipping. Null "
           "when no episode ended.", "return (env units)", _RUN, every_algorithm=EVERY,
           aliases=("rollout/ep_rew_mean", "charts/episodic_return"),
           tensorboard="rollout/ep_rew_mean"),
    Metric("return_min", "Smallest return among the episodes that ended during this "
           "iteration's rollout (as return_mean); null when none ended.",
           "return (env units)", _RUN, every_algorithm=EVERY),
    Metric("return_max", "Largest return among the episodes that ended during this "
           "iteration's rollout (as return_mean); null when none ended.",
           "return (env units)", _RUN, every_algorithm=EVERY),
    Metric("episodes", "Number of episodes that ended (terminated or truncated) during this "
           "iteration's rollout.", "episodes", _RUN, every_algorithm=EVERY),
    Metric("episode_length", "Mean length of the episodes that ended during this "
           "iteration's rollout; null when none ended.", "env steps", _RUN,
           every_algorithm=EVERY,
           aliases=("rollout/ep_len_mean", "charts/episodic_length"),
           tensorboard="rollout/ep_len_mean"),
    # --- the policy update --------------------------------------------------------------
    Metric("policy_loss", "Mean, over the update's policy-gradient evaluations, of the "
           "policy loss whose gradient was taken, entropy bonus excluded. PPO clip: per "
           "minibatch -mean(min(r A, clip(r, 1-eps, 1+eps) A)); ppo-kl: -mean(r A) + "
           "beta mean KL(old || new); TRPO: its one full-batch surrogate loss -mean(r A) "
           "at theta_old.", "loss", _UPDATE,
           aliases=("train/policy_gradient_loss", "losses/policy_loss"),
           tensorboard="train/policy_gradient_loss"),
    Metric("policy_grad_norm", "L2 norm, before gradient clipping, of the gradient of "
           "(policy_loss - entropy bonus) with respect to the policy parameters; mean over "
           "the same evaluations as policy_loss (PPO: each minibatch; TRPO: its one "
           "full-batch gradient).", "gradient norm", _UPDATE,
           aliases=("grad_norm",), legacy="grad_norm"),
    Metric("ratio_max", "Largest probability ratio pi_theta(a|s) / pi_old(a|s) over every "
           "minibatch of every epoch, each evaluated before that minibatch's step.",
           "ratio", _UPDATE),
    Metric("ratio_min", "Smallest probability ratio pi_theta / pi_old over every minibatch "
           "of every epoch, each evaluated before that minibatch's step.", "ratio", _UPDATE),
    Metric("clip_fraction", "Fraction of the probability ratios of every minibatch of every "
           "epoch (each evaluated before that minibatch's step) with |r - 1| > eps_ref; "
           + _EPS_REF + ".", "fraction", _UPDATE,
           aliases=("train/clip_fraction", "losses/clipfrac"),
           tensorboard="train/clip_fraction"),
    Metric("ratio_first_minibatch_dev", "max |r - 1| of the ratios at the update's first "
           "loss evaluation (PPO: the first minibatch of the first epoch; TRPO: the full "
           "batch at theta_old). The policy has not moved yet, so it must be 0: a bug "
           "detector for stale log-probabilities.", "ratio", _UPDATE),
    Metric("epochs_run", "Policy epochs completed in this update: epochs, or fewer when "
           "kl_stop stopped early (the epoch whose KL exceeded 1.5 x target_kl counts).",
           "epochs", _UPDATE),
    Metric("kl_beta", "The KL-penalty coefficient beta used in this update (it is adapted "
           "for the next one from kl_mean).", "1", _UPDATE, condition="ppo-kl only",
           requires=("ppo-kl",)),
    Metric("lr", "The policy's Adam learning rate used in this iteration, after annealing "
           "(lr_anneal: policy_lr x (1 - (iteration - 1) / iterations)).", "learning rate",
           _UPDATE, aliases=("learning_rate", "train/learning_rate",
                                   "charts/learning_rate"), legacy="learning_rate",
           tensorboard="train/learning_rate"),
    Metric("step_fraction", "Accepted fraction of the full natural-gradient step "
           "(backtrack_coef ** k for the accepted trial k), 0 when the line search "
           "rejected every trial.", "fraction", _UPDATE),
    Metric("linesearch_steps", "Line-search trials made: the index (from 1) of the accepted "
           "trial, or backtrack_iters when none was accepted.", "trials", _UPDATE),
    Metric("step_norm", "L2 norm of the accepted change of the policy parameters (0 when "
           "no step was accepted).", "parameter norm", _UPDATE),
    # --- how far the policy moved ---------------------------------------------------------
    Metric("ratio_max_after", "Largest probability ratio pi_new(a|s) / pi_old(a|s) over the "
           "whole training batch after the update (the trust-region comparison across "
           "algorithms).", "ratio", _CHANGE, legacy="ratio_max"),
    Metric("ratio_min_after", "Smallest probability ratio pi_new / pi_old over the whole "
           "training batch after the update.", "ratio", _CHANGE, legacy="ratio_min"),
    Metric("clip_fraction_after", "Fraction of the whole training batch whose ratio "
           "pi_new / pi_old after the update has |r - 1| > eps_ref; " + _EPS_REF + ".",
           "fraction", _CHANGE, legacy="clip_fraction"),
    Metric("kl_mean", "Mean over the training batch's states of the analytic KL(old || "
           "new) between the data-collecting policy and the updated policy.", "nats",
           _CHANGE),
    Metric("kl_max", "Largest analytic KL(old || new) over the training batch's states, "
           "after the update.", "nats", _CHANGE),
    Metric("kl_heldout_mean", "Mean analytic KL(old || new) after the update on the states "
           "of the previous iteration's batch (states this update did not train on).",
           "nats", _CHANGE, **_HELDOUT),
    Metric("kl_heldout_max", "Largest analytic KL(old || new) after the update on the "
           "previous iteration's states.", "nats", _CHANGE, **_HELDOUT),
    Metric("approx_kl", "The k3 estimator mean((r - 1) - log r) of KL(old || new), with r = "
           "pi_new / pi_old of the batch actions after the update.", "nats", _CHANGE,
           aliases=("kl_k3", "train/approx_kl", "losses/approx_kl"), legacy="kl_k3",
           tensorboard="train/approx_kl"),
    # --- the policy that collected the batch ----------------------------------------------
    Metric("entropy", "Mean entropy of the data-collecting policy (before the update) over "
           "the batch states.", "nats", _POLICY, aliases=("losses/entropy",),
           tensorboard="train/entropy_loss", tensorboard_scale=-1.0),
    Metric("entropy_frac", "entropy / log(number of actions): the data-collecting policy's "
           "entropy as a fraction of the uniform policy's (null with a single action).",
           "fraction", _POLICY, condition="discrete actions only",
           requires=("discrete",)),
    Metric("policy_std", "Mean over action dimensions of exp(log_std) of the "
           "data-collecting policy (before the update).", "action units", _POLICY,
           aliases=("train/std",), **_GAUSSIAN,
           tensorboard="train/std"),
    Metric("action_saturation", "Fraction of the action components sampled in this "
           "iteration's rollout that lie outside the action space's bounds (the env gets "
           "them clipped to the bound when action_clip is on): near 1, the policy acts at "
           "the bounds almost always.", "fraction", _POLICY,
           **_GAUSSIAN),
    # --- the value function -------------------------------------------------------------
    Metric("value_loss", "Mean over the value net's gradient steps (every minibatch of every "
           "epoch) of the value loss, the clipped one when value_clip is on.", "loss",
           _VALUE, aliases=("train/value_loss", "losses/value_loss"),
           tensorboard="train/value_loss"),
    Metric("value_grad_norm", "Mean over the value net's gradient steps of the L2 norm, "
           "before gradient clipping, of the value loss's gradient with respect to the "
           "value parameters.", "gradient norm", _VALUE),
    Metric("explained_variance", "1 - Var(R - V) / Var(R) over the training batch, with R "
           "the value targets (GAE returns) and V the values predicted before the update; "
           "null when R is constant.", "1", _VALUE, every_algorithm=EVERY,
           aliases=("train/explained_variance", "losses/explained_variance"),
           tensorboard="train/explained_variance"),
    Metric("value_target_absmax", "Largest |R| over the training batch of the value "
           "targets R (GAE returns), in the reward units the value net learns (after "
           "reward_multiplier, scaling and clipping).", "return (learner units)", _VALUE),
    Metric("advantage_absmax", "Largest |A| over the training batch of the GAE advantages, "
           "in the reward units the value net learns, before any advantage normalization.",
           "return (learner units)", _VALUE),
    Metric("value_lr", "The value net's Adam learning rate used in this iteration, after "
           "annealing (lr_anneal: value_lr x (1 - (iteration - 1) / iterations)).",
           "learning rate", _VALUE, every_algorithm=EVERY),
    Metric("feature_dot", _PHI + "mean of phi(s_t) . phi(s_t+1) over the batch's "
           "consecutive pairs within an episode (no termination or truncation between). "
           "Growth means feature co-adaptation (DR3, Kumar et al. 2021; docs/dr3.md). Null "
           "when the batch has no such pair.", "dot product", _VALUE,
           every_algorithm=EVERY, **_FEATURES),
    Metric("feature_cosine", _PHI + "mean cosine of phi(s_t) and phi(s_t+1) over the pairs "
           "of feature_dot. Null when there is none.", "cosine", _VALUE,
           every_algorithm=EVERY, **_FEATURES),
    Metric("feature_norm", _PHI + "mean Euclidean norm |phi(s)| over the batch's states.",
           "norm", _VALUE, every_algorithm=EVERY, **_FEATURES),
    Metric("feature_srank", "phi(s) = the value net's penultimate activations "
           "(ValueNet.features), after this iteration's update, on a fixed evaluation set: "
           "states of the run's first training batch (all of them, or 2,048 drawn with the "
           "run's seed when it has more), the same input vectors at every iteration; "
           "effective rank srank_0.01 of their feature matrix: the fewest singular values "
           "holding 99% of their sum (Kumar et al. 2020). At most feature_srank_rows and "
           "the feature width; compare it only between runs with the same "
           "feature_srank_rows.", "dimensions", _VALUE, every_algorithm=EVERY, **_FEATURES),
    Metric("feature_srank_rows", "Number of states (rows) of the fixed evaluation set "
           "feature_srank is measured on: min(2,048, the first batch's states), the same "
           "for the whole run.", "states", _VALUE, every_algorithm=EVERY, **_FEATURES),
    # --- evaluation during training (pgscope.periodic_eval, config eval_every) -----------
    Metric("eval_return", "Mean undiscounted return, in the env's own reward units, of "
           + _EVAL_EPISODES + "; what pgscope evaluate RUN --checkpoint ITERATION --episodes "
           "eval_episodes --seed eval_seed (--stochastic when not eval_deterministic) prints for "
           "this iteration's checkpoint.",
           "return (env units)", _EVAL, every_algorithm=EVERY,
           aliases=("eval/mean_reward",), tensorboard="eval/mean_reward", **_EVALUATED),
    Metric("eval_return_low", "Lower end of the 95% percentile-bootstrap interval of "
           "eval_return over its episodes (resampling episodes, as pgscope evaluate).",
           "return (env units)", _EVAL, every_algorithm=EVERY, **_EVALUATED),
    Metric("eval_return_high", "Upper end of the 95% percentile-bootstrap interval of "
           "eval_return over its episodes (as eval_return_low).", "return (env units)", _EVAL,
           every_algorithm=EVERY, **_EVALUATED),
    Metric("eval_episode_length", "Mean length of the evaluation's episodes.", "env steps",
           _EVAL, every_algorithm=EVERY, aliases=("eval/mean_ep_length",),
           tensorboard="eval/mean_ep_length", **_EVALUATED),
    Metric("eval_episodes", "Number of episodes the evaluation played (config "
           "eval_episodes).", "episodes", _EVAL, every_algorithm=EVERY, **_EVALUATED),
    Metric("eval_few_samples", "True when the interval rests on fewer than 10 episodes "
           "(pgscope.seed_statistics.FEW_SAMPLES): it then understates the uncertainty, as "
           "pgscope evaluate notes.", "flag", _EVAL, every_algorithm=EVERY, **_EVALUATED),
    Metric("eval_seed", "Env seed of the evaluation's first episode (episode i: eval_seed + "
           "i), drawn from the run's seed and the iteration (pgscope.periodic_eval."
           "eval_seed): never the training envs' seeds.", "seed", _EVAL,
           every_algorithm=EVERY, **_EVALUATED),
    # --- wall-clock timing (excluded from determinism checks) ----------------------------
    Metric("sps", "Env steps of this iteration per wall-clock second of its rollout and "
           "update.", "env steps / second", _TIME, every_algorithm=EVERY, timing=True,
           aliases=("time/fps", "charts/SPS"),
           tensorboard="time/fps"),
    Metric("cpu_s", "CPU seconds the training process spent on this iteration's rollout "
           "and update (user + system time of the process: for seeds trained together, "
           "the whole batch's); unlike wall-clock time it does not grow when other work "
           "shares the machine, so the doctor's sps-decay judges slowdowns on it.",
           "seconds", _TIME, every_algorithm=EVERY, timing=True),
    Metric("rollout_s", "Wall-clock seconds spent sampling this iteration's batch.",
           "seconds", _TIME, every_algorithm=EVERY, timing=True),
    Metric("update_s", "Wall-clock seconds spent in this iteration's update (policy, value "
           "net and the update's metrics).", "seconds", _TIME, every_algorithm=EVERY,
           timing=True),
    Metric("time_elapsed", "Wall-clock seconds of rollouts and updates summed over all "
           "iterations so far, across resumes (checkpointing and probes not included).",
           "seconds", _TIME, every_algorithm=EVERY, timing=True,
           aliases=("time/time_elapsed",), tensorboard="time/time_elapsed"),
)

#: The registry by key.
REGISTRY: dict[str, Metric] = {m.name: m for m in METRICS}

#: Metrics that measure wall-clock time, excluded from determinism checks.
TIMING_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS if m.timing)

#: The key whose value is the global step of TensorBoard events (env steps, as in SB3).
GLOBAL_STEP = "env_steps"


def register_metric(metric: Metric) -> Metric:
    """Define a new per-iteration key (e.g. for a plug-in algorithm's ``logs``, which must
    be registered before the algorithm): its name must be new and its group one of
    :data:`GROUPS`. A timing key cannot be added (the training loop owns them: they are
    what determinism checks leave out)."""
    if metric.name in REGISTRY:
        raise ValueError(f"metric '{metric.name}' is already defined.")
    if metric.group not in GROUPS:
        raise ValueError(f"metric '{metric.name}': group must be one of {', '.join(GROUPS)}, "
                         f"got '{metric.group}'.")
    if metric.timing:
        raise ValueError(f"metric '{metric.name}': timing keys belong to the training loop "
                         f"({', '.join(TIMING_KEYS)}).")
    unknown = [r for r in metric.requires if r not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"metric '{metric.name}': unknown requirement(s) {unknown}; use "
                         f"{', '.join(REQUIREMENTS)}.")
    REGISTRY[metric.name] = metric
    return metric


def algorithm_names() -> tuple[str, ...]:
    """The registered algorithms (:mod:`pgscope.algos`), in registration order."""
    from pgscope.algos import ALGORITHMS

    return ALGORITHMS.names()


def __getattr__(name: str) -> Any:
    # ALGORITHMS: the registered algorithms' names, read when asked for (the registry
    # fills as pgscope.algos is imported)
    if name == "ALGORITHMS":
        return algorithm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tensorboard_tag(name: str) -> tuple[str, float]:
    """(tag, scale) under which the TensorBoard sink writes ``scale x value`` of key
    ``name``: the metric's SB3/CleanRL-style tag where it has one, else ``pgscope/<name>``."""
    metric = REGISTRY.get(name)
    if metric is None or not metric.tensorboard:
        return f"pgscope/{name}", 1.0
    return metric.tensorboard, metric.tensorboard_scale


def metrics_for(algo: str, *, discrete: bool | None = None, ppo_loss: str | None = None,
                heldout: bool | None = None, features: bool | None = None,
                evaluation: bool | None = None) -> tuple[Metric, ...]:
    """The metrics ``algo`` logs, in registry order.

    ``discrete`` selects the action space, ``ppo_loss`` the PPO loss (``"clip"`` or
    ``"kl"``) and ``heldout`` whether this iteration has held-out states (``heldout_kl`` on
    and iteration >= 2), ``features`` whether this iteration logs the critic-feature
    metrics (``features_every``), ``evaluation`` whether it logs an evaluation's ``eval_*``
    keys (``eval_every``). A setting left ``None`` keeps the metrics whose condition
    depends on it, so ``metrics_for("ppo")`` lists every key PPO may log.
    """
    names = algorithm_names()
    if algo not in names:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {names}")
    return tuple(m for m in METRICS
                 if m.logged(algo, discrete=discrete, ppo_loss=ppo_loss, heldout=heldout,
                             features=features, evaluation=evaluation))


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
        "are excluded from determinism checks (`pgscope.metrics.TIMING_KEYS`). \"Logged "
        "by\" lists the algorithms of the algorithm registry (`pgscope.algos`) whose runs "
        "log the key.",
        "",
        "With `tensorboard` on (`pgscope train --tensorboard`), every key of a line is also "
        "written to TensorBoard event files in `RUN/tensorboard/` at global step "
        "`env_steps`, under the tag in the \"TensorBoard\" column: the stable-baselines3 "
        "name where SB3 logs that quantity (the same caveat applies), else "
        "`pgscope/<key>`. `train/entropy_loss` is minus `entropy` (SB3's sign).",
        "",
        "Metrics files written before this registry used other keys: `grad_norm` (now "
        "`policy_grad_norm`), `kl_k3` (now `approx_kl`), `learning_rate` (now `lr`, PPO "
        "only), and TRPO logged `ratio_max`, `ratio_min` and `clip_fraction` pooled over "
        "the ratios before (all 1) and after its step. Readers fall back to the old key "
        "where the table names one (`pgscope.metrics.metric_value`).",
    ]
    for group in GROUPS:
        lines += ["", f"## {group}", "",
                  "| key | meaning | unit | logged by | when | also known as | TensorBoard |",
                  "|---|---|---|---|---|---|---|"]
        for m in METRICS:
            if m.group != group:
                continue
            meaning = m.meaning
            if m.legacy:
                meaning += f" Older files: `{m.legacy}`."
            aliases = ", ".join(f"`{a}`" for a in m.aliases)
            tag, scale = tensorboard_tag(m.name)
            board = "-" if m.name == GLOBAL_STEP else f"`{tag}`" + (
                f" (x {scale:g})" if scale != 1.0 else "")
            lines.append(f"| `{m.name}` | {_cell(meaning)} | {m.unit} | "
                         f"{', '.join(m.algorithms)} | {_cell(m.condition or 'always')} | "
                         f"{aliases} | {board} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m pgscope.metrics`` (see ``__main__.py``): print docs/metrics.md."""
    sys.stdout.write(render_markdown())
