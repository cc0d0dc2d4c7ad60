"""Probe 6: is the trust region kept? ("Implementation Matters")

Two views:

* over training, from a run's ``metrics.jsonl``: per iteration, the max and min ratio
  pi_new / pi_old and the fraction of ratios outside the reference clip range on the whole
  batch after the update (``ratio_max_after``, ``ratio_min_after``,
  ``clip_fraction_after``, which PPO and TRPO both log), and the mean and max
  KL(old||new); metrics files written before those keys existed are read through their
  older keys (``ratio_max`` etc.; see :func:`pgscope.metrics.metric_value`);
* within one update, by replaying it: load the checkpoint of an iteration (agent,
  optimizer, normalization), draw a fresh batch as training would, run the algorithm's own
  update, and measure after every epoch, on the whole batch, the same quantities.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgscope.algos import update_one
from pgscope.algos.common import (
    learning_rates,
    make_optimizer,
    reference_clip_range,
    set_learning_rates,
    trust_region_stats,
)
from pgscope.config import Config
from pgscope.html_format import fmt, table
from pgscope.metrics import metric_value
from pgscope.networks import Policy
from pgscope.probes import ProbeInput, probe
from pgscope.probes.sampling import sample_batch
from pgscope.rollout import Batch
from pgscope.run import RunDir, load_agent, load_checkpoint, resolve_checkpoint

#: The cross-run series: after-update statistics every algorithm logs.
KEYS = ("ratio_max_after", "ratio_min_after", "kl_mean", "kl_max", "clip_fraction_after")
#: The update's own metrics reported with a replay (PPO's phase-wide ratio statistics too).
PHASE_KEYS = ("ratio_max", "ratio_min", "clip_fraction", *KEYS, "epochs_run")


def from_metrics(run_dir: str | Path) -> dict:
    """Per-iteration trust-region series of a run (:data:`KEYS`), and their extremes.
    ``legacy_keys`` says whether some line predates the ``*_after`` keys and was read
    through its older ones (TRPO's pooled its ratios with the on-policy ones, all 1;
    PPO's were phase-wide, over every minibatch before its step)."""
    run = RunDir.open(Path(run_dir))
    cfg = run.read_config()
    records = run.read_metrics()
    series = {k: [r.get(k) for r in records] for k in ("iteration", "env_steps")}
    series.update({k: [metric_value(r, k) for r in records] for k in KEYS})
    finite = {k: [v for v in series[k] if v is not None] for k in KEYS}
    ratio_max = finite["ratio_max_after"]
    return {
        "run": str(run_dir), "preset": cfg.preset, "env_id": cfg.env_id, "seed": cfg.seed,
        "clip_range": reference_clip_range(cfg),
        "legacy_keys": any("ratio_max_after" not in r for r in records),
        "series": series,
        "summary": {
            "ratio_max_after_max": max(ratio_max, default=float("nan")),
            "ratio_max_after_median": float(np.median(ratio_max)) if ratio_max
            else float("nan"),
            "kl_mean_max": max(finite["kl_mean"], default=float("nan")),
            "kl_mean_median": float(np.median(finite["kl_mean"])) if finite["kl_mean"]
            else float("nan"),
        },
    }


#: What a replay measures after each epoch (in this order), on the whole batch.
MEASURED = ("ratio_max_after", "ratio_min_after", "clip_fraction_after", "kl_mean", "kl_max")


def _measure(policy: Policy, old_policy: Policy, batch: Batch, clip: float) -> dict[str, float]:
    """The :data:`KEYS` statistics of ``policy`` against ``old_policy`` on the whole batch:
    the update's own ``*_after`` metrics (:func:`pgscope.algos.common.trust_region_stats`),
    at any point of the update."""
    stats = trust_region_stats(policy, old_policy, batch, clip)
    return {key: stats[key] for key in MEASURED}


def replay_update(run_dir: str | Path, iteration: int | None = None, seed: int = 0,
                  capture: dict | None = None) -> dict:
    """Replay the update that follows checkpoint ``iteration`` (default: the latest) on a
    fresh batch of the training size, measuring the trust region (:data:`KEYS`, on the
    whole batch) after each epoch; ``phase`` holds the update's own metrics.
    ``capture``, if given, receives the updated ``agent``, the ``batch``, the
    ``old_policy`` and the algorithm ``state_before`` (the landscape probe uses them).

    The update is the one training ran next (``replayed_iteration``, 1-based, as the
    metrics number it), with the learning rates training set for it (``learning_rates``;
    annealing included). After the run's last checkpoint training ran no update: the
    replay then uses the last update's learning rates and says so
    (``after_last_update``), and with annealing on they are a small fraction of the
    initial ones (``lr_fraction``)."""
    path = resolve_checkpoint(Path(run_dir), iteration)
    agent = load_agent(path)
    ckpt = load_checkpoint(path)
    cfg: Config = agent.config
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    optimizer.load_state_dict(ckpt["optimizer"])
    done = int(ckpt["iteration"])
    after_last = done >= cfg.num_iterations
    if not after_last:
        set_learning_rates(optimizer, cfg, done)  # as the training loop does before it
    lrs = learning_rates(optimizer)
    initial = {"lr": cfg.policy_lr, "value_lr": cfg.value_lr}
    batch = sample_batch(agent, cfg.steps_per_iter, seed=(seed + 11) * 10**8)
    clip = reference_clip_range(cfg)
    epochs: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(seed)
    state = dict(ckpt.get("algo_state", {}))
    if capture is not None:
        capture.update(agent=agent, batch=batch, old_policy=copy.deepcopy(agent.policy),
                       state_before=dict(state))

    def record(epoch: int, old_policy: Policy) -> None:
        epochs.append({"epoch": epoch, **_measure(agent.policy, old_policy, batch, clip)})

    metrics = update_one(cfg, agent.policy, agent.value_net, optimizer, batch, gen, state,
                         epoch_callback=record)
    return {"run": str(run_dir), "checkpoint_iteration": done,
            "replayed_iteration": done if after_last else done + 1,
            "after_last_update": after_last, "learning_rates": lrs,
            "lr_fraction": {k: v / initial[k] for k, v in lrs.items()},
            "preset": cfg.preset, "clip_range": clip, "batch_pairs": len(batch),
            "per_epoch": epochs,
            "phase": {k: metrics[k] for k in PHASE_KEYS if k in metrics}}


def representative_checkpoint(run_dir: str | Path) -> int:
    """The kept checkpoint closest to the middle of the run (the earlier on a tie; past
    iteration 0 when another is kept): its next update is a typical one, with the policy
    off its initialization and, under lr annealing, about half the initial learning rate
    (the last checkpoint's would replay at the last update's, a small fraction of it)."""
    run = RunDir.open(Path(run_dir))
    kept = sorted(run.checkpoints()) or [int(load_checkpoint(run.last_checkpoint)["iteration"])]
    middle = run.read_config().num_iterations / 2
    candidates = [k for k in kept if k > 0] or kept
    return min(candidates, key=lambda k: (abs(k - middle), k))


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


#: What the result's top-level keys hold.
SCHEMA = {"runs": "per run: the per-iteration series of KEYS and their extremes",
          "replay": "the replayed update: per_epoch measures and the update's own metrics "
                    "(phase)"}


def _replayed(rep: dict[str, Any]) -> str:
    """Which update was replayed, at which learning rate (results written before these
    were recorded say only the checkpoint)."""
    if "replayed_iteration" not in rep:
        return f"the update after checkpoint {rep.get('checkpoint_iteration', '?')}"
    lrs, fraction = rep["learning_rates"], rep["lr_fraction"]
    key = "lr" if "lr" in lrs else "value_lr"
    where = (f"the update of iteration {rep['replayed_iteration']}"
             + (" (after the run's last update: its learning rate)"
                if rep["after_last_update"] else ""))
    return f"{where}, {key} {fmt(lrs[key], 3)} ({100 * fraction[key]:.0f}% of the initial)"


def _training_ratios(r: dict[str, Any]) -> list[float]:
    """The run's own largest ratio after each update (metrics.jsonl), finite values."""
    runs = r.get("runs") or [{}]
    values = runs[0].get("series", {}).get("ratio_max_after", [])
    return [v for v in values if v is not None and np.isfinite(v)]


def _headline(result: dict[str, Any]) -> str:
    rep = result["replay"]
    phase = rep["phase"]
    ratios = _training_ratios(result)
    over = (f"; over training max ratio median {np.median(ratios):.3g}, max {max(ratios):.3g}"
            if ratios else "")
    return (f"trust-region: replayed {_replayed(rep)}: mean KL {phase['kl_mean']:.3g}, "
            f"max ratio {phase.get('ratio_max_after', phase.get('ratio_max', float('nan'))):.3g}"
            + over)


def _plot(result: dict[str, Any], path: Path) -> None:
    from pgscope.probes.plots import plot_trust_region

    plot_trust_region(result["runs"], result["replay"], path)


def _reading(r: dict[str, Any]) -> str:
    """The replayed update and the run's own metrics in one verdict: the ratios "stay
    within the clip range" only when they do in both (a replay at an annealed learning
    rate must not speak for the whole run)."""
    rep = r["replay"]
    phase, clip = rep["phase"], rep.get("clip_range", 0.2)
    ratio = phase.get("ratio_max_after", phase.get("ratio_max"))
    limit = 1 + clip
    text = (f"In {_replayed(rep)}, replayed on a fresh batch, the largest ratio reaches "
            f"{fmt(ratio, 3)} (1 + eps = {fmt(limit, 3)}) with mean KL "
            f"{fmt(phase['kl_mean'], 3)}.")
    ratios = _training_ratios(r)
    if ratios:
        outside = sum(v > limit for v in ratios)
        text += (f" Over training (the run's metrics) the largest ratio after an update has "
                 f"median {fmt(float(np.median(ratios)), 3)} and maximum "
                 f"{fmt(max(ratios), 3)}, above 1 + eps in {outside} of {len(ratios)} "
                 f"iterations.")
    else:
        outside = 0
    if ratio <= limit and not outside:
        return text + " The ratios stay within the clip range."
    if ratio <= limit:
        return text + (" This replay stays within the clip range, but training's updates "
                       "do not: the update does not keep the ratios there.")
    return text + " The update does not keep the ratios within the clip range."


def _summary(s: dict[str, Any], key: str, legacy: str) -> Any:
    """``summary[key]`` of :func:`from_metrics`, or its name in results written before the
    ``*_after`` keys (``ratio_max_median``, ``ratio_max_max``)."""
    return s.get(key, s.get(legacy))


def _table(r: dict[str, Any]) -> str:
    rep = r["replay"]
    rows = [[e["epoch"], fmt(e.get("ratio_max_after", e.get("ratio_max"))),
             fmt(e.get("ratio_min_after", e.get("ratio_min"))), fmt(e["kl_mean"]),
             fmt(e["kl_max"]), fmt(e.get("clip_fraction_after",
                                         e.get("clip_fraction")))]
            for e in rep["per_epoch"]]
    runs = [[f"{x.get('preset')} s{x.get('seed')}",
             fmt(_summary(s, "ratio_max_after_median", "ratio_max_median")),
             fmt(_summary(s, "ratio_max_after_max", "ratio_max_max")),
             fmt(s.get("kl_mean_median")), fmt(s.get("kl_mean_max"))]
            for x in r.get("runs", []) for s in [x.get("summary", {})]]
    return (table(["epoch of the replayed update", "max ratio", "min ratio", "mean KL",
                   "max KL", "clip fraction"], rows, (0, 1, 2, 3, 4, 5))
            + f'<p class="note">Each measured on the replayed batch, '
              f'{fmt(rep.get("batch_pairs"))} state-action pairs; over training, one value '
              f"per iteration of each run (metrics.jsonl).</p>"
            + table(["run", "max ratio (median over iterations)", "max ratio (max)",
                     "mean KL (median)", "mean KL (max)"], runs, (1, 2, 3, 4)))


@probe("trust-region", order=50, settings=("compare",), plot=_plot, headline=_headline,
       schema=SCHEMA, reading=_reading, table=_table)
def _compute(p: ProbeInput) -> dict[str, Any]:
    """Max/min ratio, mean/max KL and clip fraction per iteration (from metrics.jsonl, of
    several runs) and per epoch within a replayed update."""
    return {"runs": [from_metrics(p.run_dir)] + [from_metrics(c) for c in p.settings.compare],
            "replay": replay_update(p.run_dir, p.checkpoint, p.seed)}
