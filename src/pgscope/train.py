"""The training loop: rollout -> update -> metrics line -> checkpoint, per iteration.

The loop trains and keeps the run directory's state (writer lock, checkpoints, status,
exact resume); everything that watches a run (the metrics file, the progress bar,
TensorBoard, the CSV writer, the scheduled probes, a user's callbacks) subscribes to its
events (:mod:`pgscope.callbacks`). The update rule comes from the algorithm registry
(:mod:`pgscope.algos`): the loop never names an algorithm or a probe.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

from pgscope.agent import Agent, build_agent, spaces_signature
from pgscope.algos import algorithm
from pgscope.algos.common import explained_variance, learning_rates, make_optimizer
from pgscope.callbacks import (
    Callback,
    CallbackList,
    CheckpointSaved,
    Divergence,
    IterationEnd,
    RunEnd,
    RunStart,
)
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
from pgscope.sinks import default_sinks


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


def keep_checkpoint(run: RunDir, cfg: Config, iteration: int) -> Path | None:
    """Copy ``last.pt`` to ``checkpoints/iter_XXXXXX.pt`` every ``checkpoint_every``
    iterations and at the last one; return the copy (``None`` when none is kept)."""
    if iteration % cfg.checkpoint_every == 0 or iteration == cfg.num_iterations:
        kept = run.checkpoint_dir / f"iter_{iteration:06d}.pt"
        atomic_write_bytes(kept, run.last_checkpoint.read_bytes())
        return kept
    return None


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
          total_steps: int | None = None, repair: bool = False,
          callbacks: Sequence[Callback] = ()) -> Path:
    """Train an agent as ``cfg`` says and return its run directory.

    ``callbacks`` (:class:`pgscope.callbacks.Callback`) receive the run's events after the
    built-in subscribers (metrics file, progress bar when ``progress``, TensorBoard and
    CSV when the config switches them on, scheduled probes); one returning ``False`` from
    ``on_iteration_end`` stops training after that iteration (status ``interrupted``).

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
        return _train(cfg, run, resume, progress, repair, callbacks)
    finally:
        lock.release()


def _train(cfg: Config, run: RunDir, resume: bool, progress: bool, repair: bool,
           callbacks: Sequence[Callback]) -> Path:
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

    def checkpoint(iteration: int) -> Path | None:
        """Write ``last.pt``; keep a copy every ``checkpoint_every`` and at the end."""
        extra = dict(update_rng=update_gen.get_state(), collector=collector.state_dict(),
                     algo_state=algo_state, heldout_obs=heldout_obs, elapsed=elapsed)
        save_checkpoint(run.last_checkpoint, agent, iteration=iteration, env_steps=env_steps,
                        optimizer=optimizer, extra=extra, spaces=spaces)
        return keep_checkpoint(run, cfg, iteration)

    def status(state: str, iteration: int, **extra: Any) -> None:
        run.write_status(state, iteration=iteration, total_iterations=cfg.num_iterations,
                         env_steps=env_steps, **extra)

    events = CallbackList([*default_sinks(cfg, run, progress), *callbacks])

    def end(state: str, iteration: int, error: str | None = None, *, quiet: bool = False
            ) -> None:
        """``on_run_end``; ``quiet`` (while an error propagates): a subscriber's own error
        is reported on stderr instead of replacing the run's."""
        try:
            events.on_run_end(RunEnd(run.path, cfg, state, iteration, error))
        except Exception as exc:
            if not quiet:
                raise
            print(f"warning: a subscriber failed at the end of the run: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)

    if start == 0:
        checkpoint(0)
    status("running", start)
    update = algorithm(cfg.algo).update
    it = completed = start  # completed: iterations with a metrics line and a checkpoint
    try:
        # the first subscriber to fail stops the run like any error of the loop
        events.on_run_start(RunStart(run.path, cfg, agent, start, env_steps, resume))
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
            record = _json_safe(record)
            go_on = events.on_iteration_end(IterationEnd(run.path, cfg, agent, it + 1,
                                                         env_steps, record, batch))
            kept = checkpoint(it + 1)
            completed = it + 1
            status("running", completed, return_mean=record["return_mean"])
            events.on_checkpoint(CheckpointSaved(run.path, cfg, completed, env_steps,
                                                 run.last_checkpoint, kept))
            if go_on is False:
                raise _Stopped(f"stopped by the callback {events.stopped_by} after "
                               f"iteration {completed}")
    except _Stopped as stop:
        status("interrupted", completed, error=str(stop))
        run.log(f"{stop}; resume with 'pgscope train --resume {run.path}'")
        end("interrupted", completed, str(stop))
        return run.path
    except DivergenceError as exc:
        if exc.iteration < 0:  # raised by the env during this iteration's rollout
            exc.iteration = it + 1
            exc.args = (f"{exc} (iteration {it + 1})",)
        status("diverged", exc.iteration, where=exc.where, error=str(exc),
               last_good_checkpoint=str(run.last_checkpoint))
        events.on_divergence(Divergence(run.path, cfg, exc.iteration, exc.where, str(exc)))
        end("diverged", exc.iteration, str(exc), quiet=True)
        raise
    except KeyboardInterrupt:
        error = "interrupted by the user (SIGINT/SIGTERM)"
        status("interrupted", completed, error=error)
        end("interrupted", completed, error, quiet=True)
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        status("failed", completed, error=error)
        end("failed", completed, error, quiet=True)
        raise
    finally:
        envs.close()
    status("complete", cfg.num_iterations)
    end("complete", cfg.num_iterations)
    return run.path


class _Stopped(Exception):
    """A callback asked to stop training."""


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
