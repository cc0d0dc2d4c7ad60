"""Probe 6: is the trust region kept? (SPEC.md section 3; "Implementation Matters")

Two views:

* over training, from a run's ``metrics.jsonl``: max and min ratio, mean and max
  KL(old||new), fraction of ratios outside the clip range, per iteration;
* within one update, by replaying it: load the checkpoint of an iteration (agent,
  optimizer, normalization), draw a fresh batch as training would, run the algorithm's own
  update, and measure after every epoch, on the whole batch, the same quantities.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from pgscope.algos.common import make_optimizer, reference_clip_range
from pgscope.algos.ppo import ppo_update
from pgscope.algos.trpo import trpo_update
from pgscope.config import Config
from pgscope.networks import Policy
from pgscope.probes.sampling import sample_batch
from pgscope.rollout import Batch
from pgscope.run import RunDir, load_agent, load_checkpoint, resolve_checkpoint

KEYS = ("ratio_max", "ratio_min", "kl_mean", "kl_max", "clip_fraction")


def from_metrics(run_dir: str | Path) -> dict:
    """Per-iteration trust-region series of a run, and their extremes."""
    run = RunDir.open(Path(run_dir))
    cfg = run.read_config()
    records = run.read_metrics()
    series = {k: [r.get(k) for r in records] for k in ("iteration", "env_steps", *KEYS)}
    finite = {k: [v for v in series[k] if v is not None] for k in KEYS}
    return {
        "run": str(run_dir), "preset": cfg.preset, "env_id": cfg.env_id, "seed": cfg.seed,
        "clip_range": reference_clip_range(cfg),
        "series": series,
        "summary": {
            "ratio_max_max": max(finite["ratio_max"], default=float("nan")),
            "ratio_max_median": float(np.median(finite["ratio_max"])) if finite["ratio_max"]
            else float("nan"),
            "kl_mean_max": max(finite["kl_mean"], default=float("nan")),
            "kl_mean_median": float(np.median(finite["kl_mean"])) if finite["kl_mean"]
            else float("nan"),
        },
    }


@torch.no_grad()
def _measure(policy: Policy, old_policy: Policy, batch: Batch, clip: float) -> dict[str, float]:
    old, new = old_policy.dist(batch.obs), policy.dist(batch.obs)
    kl = policy.kl(old, new)
    ratio = (policy.log_prob(new, batch.actions) - batch.logp).exp()
    return {"ratio_max": float(ratio.max()), "ratio_min": float(ratio.min()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "clip_fraction": float(((ratio - 1).abs() > clip).double().mean())}


def replay_update(run_dir: str | Path, iteration: int | None = None, seed: int = 0,
                  capture: dict | None = None) -> dict:
    """Replay the update that follows checkpoint ``iteration`` (default: the latest) on a
    fresh batch of the training size, measuring the trust region after each epoch.
    ``capture``, if given, receives the updated ``agent``, the ``batch``, the
    ``old_policy`` and the algorithm ``state_before`` (the landscape probe uses them)."""
    path = resolve_checkpoint(Path(run_dir), iteration)
    agent = load_agent(path)
    ckpt = load_checkpoint(path)
    cfg: Config = agent.config
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    optimizer.load_state_dict(ckpt["optimizer"])
    batch = sample_batch(agent, cfg.steps_per_iter, seed=(seed + 11) * 10**8)
    clip = reference_clip_range(cfg)
    epochs: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(seed)
    state = dict(ckpt.get("algo_state", {}))
    if capture is not None:
        capture.update(agent=agent, batch=batch, old_policy=copy.deepcopy(agent.policy),
                       state_before=dict(state))
    if cfg.algo == "ppo":
        def record(epoch: int, old_policy: Policy) -> None:
            epochs.append({"epoch": epoch, **_measure(agent.policy, old_policy, batch, clip)})

        metrics = ppo_update(cfg, agent.policy, agent.value_net, optimizer, batch, gen, state,
                             epoch_callback=record)
    else:
        old_policy = copy.deepcopy(agent.policy)
        metrics = trpo_update(cfg, agent.policy, agent.value_net, optimizer, batch, gen, state)
        epochs.append({"epoch": 1, **_measure(agent.policy, old_policy, batch, clip)})
    return {"run": str(run_dir), "checkpoint_iteration": int(ckpt["iteration"]),
            "preset": cfg.preset, "clip_range": clip, "batch_pairs": len(batch),
            "per_epoch": epochs,
            "phase": {k: metrics[k] for k in (*KEYS, "epochs_run") if k in metrics}}


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
