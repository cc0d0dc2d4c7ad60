"""The training loop: rollout -> update -> metrics line -> checkpoint, per iteration."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from pgscope.agent import Agent, build_agent, spaces_signature
from pgscope.algos.common import explained_variance, learning_rates, make_optimizer
from pgscope.algos.ppo import ppo_update
from pgscope.algos.trpo import trpo_update
from pgscope.config import Config
from pgscope.envs import check_env_id, make_vector_env
from pgscope.errors import DivergenceError
from pgscope.metrics import TIMING_KEYS  # noqa: F401 - re-exported: tests, bench
from pgscope.optimizations import annealed_lr
from pgscope.rollout import RolloutCollector
from pgscope.run import (
    RunDir,
    atomic_write_bytes,
    check_compatible,
    load_checkpoint,
    restore_agent,
    save_checkpoint,
)

UPDATES = {"ppo": ppo_update, "trpo": trpo_update}


def _env_seed(cfg: Config, start_iteration: int) -> int:
    # Envs that cannot be saved restart on resume; a different seed keeps them from
    # replaying the first episodes.
    return cfg.seed * 1000 + start_iteration * 7919


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: Config, iteration: int) -> float:
    """Apply lr annealing (if on) to each parameter group; return the policy lr."""
    base = {"policy": cfg.policy_lr, "value": cfg.value_lr}
    for group in optimizer.param_groups:
        group["lr"] = annealed_lr(base[group["name"]], iteration, cfg.num_iterations,
                                  cfg.lr_anneal)
    return annealed_lr(cfg.policy_lr, iteration, cfg.num_iterations, cfg.lr_anneal)


def _check_finite(agent: Agent, metrics: dict[str, Any], iteration: int) -> None:
    for key in ("policy_loss", "value_loss", "kl_mean", "policy_grad_norm"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise DivergenceError(f"{key} became {metrics[key]} at iteration {iteration}.",
                                  iteration, key)
    for name, net in (("policy", agent.policy), ("value net", agent.value_net)):
        if not torch.isfinite(parameters_to_vector(net.parameters())).all():
            raise DivergenceError(f"{name} parameters became non-finite at iteration "
                                  f"{iteration}.", iteration, f"{name} parameters")


def _episode_metrics(returns: list[float], lengths: list[int]) -> dict[str, Any]:
    if not returns:
        return dict(return_mean=None, return_min=None, return_max=None, episodes=0,
                    episode_length=None)
    return dict(return_mean=float(np.mean(returns)), return_min=float(np.min(returns)),
                return_max=float(np.max(returns)), episodes=len(returns),
                episode_length=float(np.mean(lengths)))


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
          total_steps: int | None = None, repair: bool = False) -> Path:
    """Train an agent as ``cfg`` says and return its run directory.

    With ``resume=True``, ``out`` must be an existing run directory: training continues
    from its last checkpoint (``cfg`` is then ignored in favour of the saved config), the
    episodes in progress continue exactly where they were (see
    :mod:`pgscope.envs.state`), and metrics lines written after that checkpoint are
    dropped and recomputed; a damaged line before it stops the resume unless ``repair``.
    ``total_steps`` (resume only) extends a run to a larger total: lr annealing is then
    planned over the new total, i.e. from the resume point the run continues exactly as a
    run planned for that total from the start would (the lr steps up at that point).

    One process writes a run at a time (an OS lock, see :class:`pgscope.run.WriterLock`);
    ``status.json`` tells the state, the writer and a heartbeat at every iteration.
    """
    out = Path(out)
    if resume:
        run = RunDir.open(out)
        lock = run.lock()
    else:
        if total_steps is not None:
            raise ValueError("total_steps extends a resumed run; set cfg.total_steps instead.")
        check_env_id(cfg.env_id)  # fail before anything is written
        run, lock = RunDir.create(out, cfg)
    try:
        if resume:
            cfg = run.read_config()
            if total_steps is not None and total_steps != cfg.total_steps:
                cfg = run.extend(cfg, total_steps)
        return _train(cfg, run, resume, progress, repair)
    finally:
        lock.release()


def _train(cfg: Config, run: RunDir, resume: bool, progress: bool, repair: bool) -> Path:
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    envs = make_vector_env(cfg.env_id, cfg.num_envs)
    spaces = spaces_signature(envs.single_observation_space, envs.single_action_space)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    update_gen = torch.Generator().manual_seed(cfg.seed + 1)
    algo_state: dict[str, float] = {}
    heldout_obs: torch.Tensor | None = None
    start, env_steps, elapsed = 0, 0, 0.0
    ckpt: dict[str, Any] = {}

    if resume and run.last_checkpoint.exists():
        ckpt = load_checkpoint(run.last_checkpoint)
        check_compatible(ckpt, run.last_checkpoint, spaces, cfg)
        restore_agent(agent, ckpt, run.last_checkpoint)
        optimizer.load_state_dict(ckpt["optimizer"])
        update_gen.set_state(ckpt["update_rng"])
        algo_state = dict(ckpt["algo_state"])
        heldout_obs = ckpt.get("heldout_obs")
        start, env_steps, elapsed = ckpt["iteration"], ckpt["env_steps"], ckpt["elapsed"]
    if resume:
        run.truncate_metrics(start, repair=repair)
    collector = RolloutCollector(cfg, envs, agent.preprocessor, seed=_env_seed(cfg, start))
    if start > 0:
        if "collector" in ckpt:
            exact = collector.load_state_dict(ckpt["collector"])
        else:  # a checkpoint written before envs were saved
            collector.rng.bit_generator.state = ckpt["sample_rng"]
            exact = False
        note = "episodes continue exactly" if exact else (
            "WARNING: this env's state cannot be saved, so its episodes restart; metrics "
            "after this point differ from an uninterrupted run")
        run.log(f"resumed from the checkpoint of iteration {start}: {note}")
        if not exact:
            print(f"warning: {cfg.env_id}: {note}.", file=sys.stderr)

    def checkpoint(iteration: int) -> None:
        extra = dict(update_rng=update_gen.get_state(), collector=collector.state_dict(),
                     algo_state=algo_state, heldout_obs=heldout_obs, elapsed=elapsed)
        save_checkpoint(run.last_checkpoint, agent, iteration=iteration, env_steps=env_steps,
                        optimizer=optimizer, extra=extra, spaces=spaces)
        if (iteration % cfg.checkpoint_every == 0 or iteration == cfg.num_iterations
                or _probe_due(cfg, iteration)):
            kept = run.checkpoint_dir / f"iter_{iteration:06d}.pt"
            atomic_write_bytes(kept, run.last_checkpoint.read_bytes())

    def status(state: str, iteration: int, **extra: Any) -> None:
        run.write_status(state, iteration=iteration, total_iterations=cfg.num_iterations,
                         env_steps=env_steps, **extra)

    if start == 0:
        checkpoint(0)
    status("running", start)
    _probe_if_due(cfg, run, start, progress)  # a kill during the last probe: redo it
    bar = tqdm(total=cfg.num_iterations * cfg.steps_per_iter, initial=env_steps, unit="step",
               disable=not progress, desc=f"{cfg.preset} {cfg.env_id} s{cfg.seed}",
               dynamic_ncols=True)
    update = UPDATES[cfg.algo]
    it = completed = start  # completed: iterations with a metrics line and a checkpoint
    try:
        for it in range(start, cfg.num_iterations):
            set_learning_rates(optimizer, cfg, it)
            t0 = time.perf_counter()
            batch, episodes = collector.collect(agent.policy, agent.value_net)
            t1 = time.perf_counter()
            metrics = update(cfg, agent.policy, agent.value_net, optimizer, batch, update_gen,
                             algo_state, heldout_obs)
            t2 = time.perf_counter()
            _check_finite(agent, metrics, it + 1)
            heldout_obs = batch.obs if cfg.heldout_kl else None
            env_steps += len(batch)
            elapsed += t2 - t0
            record = dict(iteration=it + 1, env_steps=env_steps,
                          **_episode_metrics(episodes.returns, episodes.lengths),
                          explained_variance=explained_variance(batch.values, batch.returns),
                          **learning_rates(optimizer), **metrics,
                          sps=len(batch) / (t2 - t0), rollout_s=t1 - t0, update_s=t2 - t1,
                          time_elapsed=elapsed)
            run.append_metrics(_json_safe(record))
            checkpoint(it + 1)
            completed = it + 1
            status("running", completed, return_mean=record["return_mean"])
            _probe_if_due(cfg, run, it + 1, progress)
            bar.update(len(batch))
            bar.set_postfix(ret=_fmt(record["return_mean"]), sps=f"{record['sps']:.0f}")
    except DivergenceError as exc:
        if exc.iteration < 0:  # raised by the env during this iteration's rollout
            exc.iteration = it + 1
            exc.args = (f"{exc} (iteration {it + 1})",)
        status("diverged", exc.iteration, where=exc.where, error=str(exc),
               last_good_checkpoint=str(run.last_checkpoint))
        raise
    except KeyboardInterrupt:
        status("interrupted", completed, error="interrupted by the user (SIGINT/SIGTERM)")
        raise
    except Exception as exc:
        status("failed", completed, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
        envs.close()
    status("complete", cfg.num_iterations)
    return run.path


def _probe_due(cfg: Config, iteration: int) -> bool:
    return bool(cfg.probe_every) and iteration > 0 and iteration % cfg.probe_every == 0


def _probe_if_due(cfg: Config, run: RunDir, iteration: int, progress: bool) -> None:
    """Run the scheduled probes of ``iteration``. A probe that raises never stops training:
    the failure is recorded (``probes/failures.jsonl`` and ``events.log``) and not retried
    on resume; the message says how to re-run it."""
    if not _probe_due(cfg, iteration):
        return
    from pgscope.probes import scheduled_probe_failures, scheduled_probes

    if iteration in scheduled_probe_failures(run.path):
        return
    try:
        scheduled_probes(run.path, iteration, progress=progress)
    except Exception as exc:  # noqa: BLE001 - recorded; training goes on
        error = f"{type(exc).__name__}: {exc}"
        record = {"iteration": iteration, "probes": cfg.probe_kinds, "error": error}
        (run.path / "probes").mkdir(exist_ok=True)
        with open(run.path / "probes" / "failures.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        rerun = (f"pgscope probe {cfg.probe_kinds} {run.path} --checkpoint {iteration} "
                 f"--out {run.path / 'probes' / f'iter_{iteration:06d}'}")
        run.log(f"scheduled probes of iteration {iteration} failed ({error}); re-run: {rerun}")
        print(f"warning: scheduled probes of iteration {iteration} failed ({error}); "
              f"training goes on. Re-run them with: {rerun}", file=sys.stderr)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
