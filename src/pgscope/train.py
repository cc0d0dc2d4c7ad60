"""The training loop, the one engine: rollout -> update -> metrics line -> checkpoint, per
iteration, for N >= 1 seeds of one config at once.

:func:`train_batch` trains seeds that differ only in ``seed`` together, each into an
ordinary run directory (writer lock, ``config.json``, ``status.json``, ``metrics.jsonl``,
checkpoints, events to its own subscribers); :func:`train` is the batch of one and
:func:`resume` continues a run. What is shared is the work: the seeds' envs step in
lockstep with one stacked forward pass per step (:mod:`pgscope.engine.rollout`) and the
algorithm's update (:mod:`pgscope.algos`, written once over N seeds) does one stacked
forward/backward per minibatch index. Every operation computes a seed's numbers
independently of the batch, so a seed's metrics and checkpoints are bit-identical
whether it trains alone or in any batch, in any position (tests/test_engine_invariance.py).

The loop trains and keeps each run directory's state (writer lock, checkpoints, status,
exact resume); everything that watches a run (the metrics file, the progress bar,
TensorBoard, the CSV writer, the scheduled probes, a user's callbacks) subscribes to its
events (:mod:`pgscope.callbacks`). The loop never names an algorithm or a probe. A seed
that diverges or fails is recorded as such and leaves the batch; the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from pgscope.agent import Agent, build_agent, spaces_signature
from pgscope.algos import algorithm
from pgscope.algos.common import (
    explained_variance,
    learning_rates,
    make_optimizer,
    set_learning_rates,
)
from pgscope.callbacks import (
    Callback,
    CallbackList,
    CheckpointSaved,
    Divergence,
    IterationEnd,
    RunEnd,
    RunStart,
)
from pgscope.config import Config, training_dict
from pgscope.engine.nets import SeedNets
from pgscope.engine.rollout import collect_lockstep
from pgscope.envs import check_env_id, make_vector_env
from pgscope.errors import ConfigError, DivergenceError, RunDirError
from pgscope.metrics import TIMING_KEYS  # noqa: F401 - re-exported: tests, bench
from pgscope.rollout import RolloutCollector
from pgscope.run import (
    RunDir,
    WriterLock,
    atomic_write_bytes,
    check_compatible,
    load_checkpoint,
    restore_agent,
    save_checkpoint,
)
from pgscope.sinks import check_sinks, default_sinks


def _env_seed(cfg: Config, start_iteration: int) -> int:
    # Envs that cannot be saved restart on resume; a different seed keeps them from
    # replaying the first episodes.
    return cfg.seed * 1000 + start_iteration * 7919


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


#: ``callbacks`` of :func:`train_batch`: one sequence for every member, or a function of
#: the member's index giving its own.
Callbacks = Sequence[Callback] | Callable[[int], Sequence[Callback]]


@dataclass
class BatchMember:
    """How one member of a batch ended: ``state`` is ``complete``, ``diverged``,
    ``failed`` or ``interrupted`` (as its ``status.json`` says), ``error`` the reason,
    ``iteration`` its last completed (checkpointed) iteration and ``exception`` what was
    raised, if anything (:func:`train` raises it again)."""

    path: Path
    state: str
    error: str | None = None
    iteration: int = 0
    exception: BaseException | None = dataclasses.field(default=None, repr=False,
                                                        compare=False)

    def result(self) -> Path:
        """The run directory, or what ended the run raised again (a single run's caller
        gets its own exception, as :func:`train` promises)."""
        if self.exception is not None:
            raise self.exception
        return self.path


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
          total_steps: int | None = None, repair: bool = False,
          callbacks: Sequence[Callback] = ()) -> Path:
    """Train an agent as ``cfg`` says and return its run directory: :func:`train_batch`
    of one seed, so its numbers are those the seed gets in any batch.

    ``callbacks`` (:class:`pgscope.callbacks.Callback`) receive the run's events after the
    built-in subscribers (metrics file, progress bar when ``progress``, TensorBoard and
    CSV when the config switches them on, scheduled probes); one returning ``False`` from
    ``on_iteration_end`` stops training after that iteration (status ``interrupted``).

    ``resume=True`` (or :func:`resume`) continues the run directory ``out`` from its last
    checkpoint (``cfg`` is then ignored in favour of the saved config), the episodes in
    progress continue exactly where they were (see :mod:`pgscope.envs.state`), and
    metrics lines written after that checkpoint are dropped and recomputed; a damaged line
    before it stops the resume unless ``repair``. ``total_steps`` (resume only) extends a
    run to a larger total: lr annealing is then planned over the new total, i.e. from the
    resume point the run continues exactly as a run planned for that total from the start
    would (the lr steps up at that point).

    One process writes a run at a time (an OS lock, see :class:`pgscope.run.WriterLock`);
    ``status.json`` tells the state, the writer and a heartbeat at every iteration. A run
    that diverges raises :class:`pgscope.errors.DivergenceError` after recording it; any
    other error is recorded (status ``failed``) and raised."""
    return train_batch([] if resume else [cfg], [out], resume=resume, progress=progress,
                       total_steps=total_steps, repair=repair, callbacks=callbacks)[0].result()


def resume(run_dir: str | Path, *, progress: bool = True, total_steps: int | None = None,
           repair: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Continue the run in ``run_dir`` from its last checkpoint (its saved config);
    ``total_steps`` extends it. :func:`train` with ``resume=True``, without a config."""
    return train_batch([], [run_dir], resume=True, progress=progress,
                       total_steps=total_steps, repair=repair, callbacks=callbacks)[0].result()


def check_batchable(cfgs: Sequence[Config]) -> None:
    """Refuse configs that cannot train as one batch, naming the key: they must differ
    only in ``seed`` (and keys that only observe a run), and the seeds must be distinct."""
    if not cfgs:
        raise ConfigError("a batch needs at least one config.")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the seeds of a batch must be distinct, got {seeds}.")
    first = training_dict(cfgs[0])
    for cfg in cfgs[1:]:
        other = training_dict(cfg)
        differ = sorted(k for k in first if k not in ("seed", "total_steps")
                        and first[k] != other[k])
        if cfg.total_steps != cfgs[0].total_steps:
            differ.insert(0, "total_steps")
        if differ:
            raise ConfigError(
                f"configs of one batch may differ only in 'seed'; seed {cfg.seed} differs "
                f"from seed {cfgs[0].seed} in {', '.join(repr(k) for k in differ)}.")


class RunState:
    """One run being trained (a seed of the batch): its run directory and everything the
    loop keeps for it (agent, optimizer, collector, update generator, algorithm state,
    held-out states, counters, subscribers), fresh or restored from its last
    checkpoint."""

    def __init__(self, index: int, cfg: Config, run: RunDir, resume: bool, progress: bool,
                 callbacks: Sequence[Callback]) -> None:
        self.index, self.cfg, self.run = index, cfg, run
        torch.manual_seed(cfg.seed)
        self.envs = make_vector_env(cfg.env_id, cfg.num_envs)
        self.spaces = spaces_signature(self.envs.single_observation_space,
                                       self.envs.single_action_space)
        self.agent = build_agent(cfg, self.envs.single_observation_space,
                                 self.envs.single_action_space)
        self.optimizer = make_optimizer(cfg, self.agent.policy, self.agent.value_net)
        self.update_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.algo_state: dict[str, float] = {}
        self.heldout_obs: torch.Tensor | None = None
        self.start, self.env_steps, self.elapsed = 0, 0, 0.0
        ckpt: dict[str, Any] = {}
        if resume and run.last_checkpoint.exists():
            ckpt = load_checkpoint(run.last_checkpoint)
            check_compatible(ckpt, run.last_checkpoint, self.spaces, cfg)
            restore_agent(self.agent, ckpt, run.last_checkpoint)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.update_gen.set_state(ckpt["update_rng"])
            self.algo_state = dict(ckpt["algo_state"])
            self.heldout_obs = ckpt.get("heldout_obs")
            self.start = ckpt["iteration"]
            self.env_steps, self.elapsed = ckpt["env_steps"], ckpt["elapsed"]
        self.ckpt = ckpt
        self.completed = self.start
        self.collector = RolloutCollector(cfg, self.envs, self.agent.preprocessor,
                                          seed=_env_seed(cfg, self.start))
        self.events = CallbackList([*default_sinks(cfg, run, progress), *callbacks])

    def restore_collector(self, repair: bool) -> None:
        """Drop metrics lines past the checkpoint and continue its episodes (resume)."""
        self.run.truncate_metrics(self.start, repair=repair)
        if self.start == 0:
            return
        if "collector" in self.ckpt:
            exact = self.collector.load_state_dict(self.ckpt["collector"])
        else:  # a checkpoint written before envs were saved
            self.collector.rng.bit_generator.state = self.ckpt["sample_rng"]
            exact = False
        note = "episodes continue exactly" if exact else (
            "WARNING: this env's state cannot be saved, so its episodes restart; metrics "
            "after this point differ from an uninterrupted run")
        self.run.log(f"resumed from the checkpoint of iteration {self.start}: {note}")
        if not exact:
            print(f"warning: {self.run.path}: {note}.", file=sys.stderr)

    def checkpoint(self, iteration: int) -> Path | None:
        """``last.pt`` in the single-run format; a kept copy as ``train`` keeps one."""
        extra = dict(update_rng=self.update_gen.get_state(),
                     collector=self.collector.state_dict(), algo_state=self.algo_state,
                     heldout_obs=self.heldout_obs, elapsed=self.elapsed)
        save_checkpoint(self.run.last_checkpoint, self.agent, iteration=iteration,
                        env_steps=self.env_steps, optimizer=self.optimizer, extra=extra,
                        spaces=self.spaces)
        return keep_checkpoint(self.run, self.cfg, iteration)

    def status(self, state: str, iteration: int, **extra: Any) -> None:
        self.run.write_status(state, iteration=iteration,
                              total_iterations=self.cfg.num_iterations,
                              env_steps=self.env_steps, **extra)

    def end(self, state: str, error: str | None = None,
            exception: BaseException | None = None) -> BatchMember:
        """Record how the member ended (``status.json``, ``on_run_end``, at the iteration
        that diverged for a divergence); ``exception``: what ended it, if anything."""
        iteration = self.completed
        at = exception.iteration if isinstance(exception, DivergenceError) else iteration
        if state == "diverged":
            assert error is not None
        elif state != "complete":
            self.status(state, iteration, error=error)
        else:
            self.status(state, self.cfg.num_iterations)
        try:
            self.events.on_run_end(RunEnd(self.run.path, self.cfg, state, at, error))
        except Exception as exc:
            if state == "complete":
                raise
            print(f"warning: a subscriber failed at the end of {self.run.path}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
        self.envs.close()
        return BatchMember(self.run.path, state, error, iteration, exception)

    def diverged(self, exc: DivergenceError, iteration: int) -> BatchMember:
        """Record a divergence exactly as ``train`` does (the last good checkpoint stays)."""
        if exc.iteration < 0:  # raised by the env during this iteration's rollout
            exc.iteration = iteration
            exc.args = (f"{exc} (iteration {iteration})",)
        self.status("diverged", exc.iteration, where=exc.where, error=str(exc),
                    last_good_checkpoint=str(self.run.last_checkpoint))
        try:
            self.events.on_divergence(Divergence(self.run.path, self.cfg, exc.iteration,
                                                 exc.where, str(exc)))
        except Exception as error:  # noqa: BLE001 - the divergence is what gets recorded
            print(f"warning: a subscriber failed on the divergence of {self.run.path}: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
        return self.end("diverged", str(exc), exc)


def train_batch(cfgs: Sequence[Config], outs: Sequence[str | Path], *, resume: bool = False,
                progress: bool = True, total_steps: int | None = None, repair: bool = False,
                callbacks: Callbacks = ()) -> list[BatchMember]:
    """Train one config's seeds together, one run directory per seed; returns how each
    member ended, in the order of ``outs``.

    ``cfgs`` may differ only in ``seed`` (:func:`check_batchable`). With ``resume``, each
    ``outs[i]`` is an existing run (``cfgs`` is then ignored for the saved configs) and
    every member's last checkpoint must be at the same iteration; ``total_steps`` extends
    them all. A member that diverges or fails is recorded (``status.json``, its
    subscribers' events) and leaves the batch; SIGINT/SIGTERM marks every member
    interrupted and re-raises. ``progress``: one bar for the batch (a single run's bar
    when N is 1)."""
    paths = [Path(p) for p in outs]
    if not resume:
        if total_steps is not None:
            raise ValueError("total_steps extends a resumed run; set cfg.total_steps instead.")
        if len(cfgs) != len(paths):
            raise ConfigError(f"{len(cfgs)} configs for {len(paths)} run directories.")
        check_batchable(cfgs)
        check_env_id(cfgs[0].env_id)  # fail before anything is written
        for cfg in cfgs:
            check_sinks(cfg)  # e.g. wandb=True without the wandb package
        for cfg, path in zip(cfgs, paths, strict=True):
            RunDir(path)._check_new(cfg)  # refuse before any member's directory is made
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise RunDirError("the run directories of a batch must be distinct.")
    runs: list[RunDir] = []
    locks: list[WriterLock] = []
    try:
        for i, path in enumerate(paths):
            if resume:
                runs.append(RunDir.open(path))
                locks.append(runs[-1].lock())
            else:
                run, lock = RunDir.create(path, cfgs[i])
                runs.append(run)
                locks.append(lock)
        if resume:
            cfgs = [run.read_config() for run in runs]
            for cfg in cfgs:
                check_sinks(cfg)  # before the config is extended or anything computed
            if total_steps is not None:
                cfgs = [run.extend(c, total_steps) if total_steps != c.total_steps else c
                        for run, c in zip(runs, cfgs, strict=True)]
            check_batchable(cfgs)
        return _train_batch(list(cfgs), runs, resume, progress, repair, callbacks)
    finally:
        for lock in locks:
            lock.release()


def _train_batch(cfgs: list[Config], runs: list[RunDir], resume: bool, progress: bool,
                 repair: bool, callbacks: Callbacks) -> list[BatchMember]:
    cfg = cfgs[0]
    torch.set_num_threads(cfg.torch_threads)
    own = callbacks if callable(callbacks) else (lambda _: callbacks)
    members: list[RunState] = []
    alone = len(runs) == 1  # a single run shows its own bar
    try:
        for i, (c, run) in enumerate(zip(cfgs, runs, strict=True)):
            members.append(RunState(i, c, run, resume, progress and alone, own(i)))
    except BaseException:
        for m in members:
            m.envs.close()
        raise
    starts = {m.start for m in members}
    if len(starts) > 1:
        for m in members:
            m.envs.close()
        raise RunDirError(
            "the members of a batch must resume from the same iteration; their last "
            "checkpoints are at " + ", ".join(f"{m.run.path}: {m.start}" for m in members)
            + ". Resume them in groups of equal iterations.")
    start = starts.pop()
    ended: dict[int, BatchMember] = {}
    for m in members:
        if resume:
            m.restore_collector(repair)
        if start == 0:
            m.checkpoint(0)
        m.status("running", start)
    live = list(members)
    nets = SeedNets(cfg, [m.agent.policy for m in live], [m.agent.value_net for m in live],
                    [m.optimizer for m in live])
    update = algorithm(cfg.algo).update
    bar = tqdm(total=cfg.num_iterations * cfg.steps_per_iter * len(members),
               initial=start * cfg.steps_per_iter * len(members), unit="step",
               desc=f"{cfg.preset} {cfg.env_id} x{len(members)} seeds",
               disable=not progress or alone, dynamic_ncols=True)

    def drop(gone: dict[int, BatchMember]) -> None:
        """Members that ended leave the batch."""
        nonlocal live
        if gone:
            ended.update(gone)
            keep = [k for k, m in enumerate(live) if m.index not in gone]
            live = [live[k] for k in keep]
            if live:
                nets.select(keep)

    try:
        gone: dict[int, BatchMember] = {}
        for m in members:
            try:
                m.events.on_run_start(RunStart(m.run.path, m.cfg, m.agent, start,
                                               m.env_steps, resume))
            except Exception as exc:
                gone[m.index] = m.end("failed", f"{type(exc).__name__}: {exc}", exc)
        drop(gone)
        for it in range(start, cfg.num_iterations):
            if not live:
                break
            for m in live:
                set_learning_rates(m.optimizer, m.cfg, it)
            nets.set_learning_rates(live[0].optimizer)
            t0, c0 = time.perf_counter(), time.process_time()
            collected = collect_lockstep([m.collector for m in live],
                                         [m.agent.policy for m in live],
                                         [m.agent.value_net for m in live])
            gone = {}
            for m, result in zip(live, collected, strict=True):
                if isinstance(result, DivergenceError):
                    gone[m.index] = m.diverged(result, it + 1)
                elif isinstance(result, Exception):
                    gone[m.index] = m.end("failed", f"{type(result).__name__}: {result}", result)
            drop(gone)
            if not live:
                break
            data = [r for r in collected if not isinstance(r, Exception)]
            t1 = time.perf_counter()
            all_metrics = update(cfg, nets, [b for b, _ in data],
                                 [m.update_gen for m in live], [m.algo_state for m in live],
                                 [m.heldout_obs for m in live])
            t2, c2 = time.perf_counter(), time.process_time()
            gone = {}
            for m, (batch, episodes), metrics in zip(live, data, all_metrics, strict=True):
                try:
                    _check_finite(m.agent, metrics, it + 1)
                except DivergenceError as exc:
                    gone[m.index] = m.diverged(exc, it + 1)
                    continue
                m.heldout_obs = batch.obs if m.cfg.heldout_kl else None
                m.env_steps += len(batch)
                m.elapsed += t2 - t0
                record = dict(iteration=it + 1, env_steps=m.env_steps,
                              **_episode_metrics(episodes.returns, episodes.lengths),
                              explained_variance=explained_variance(batch.values,
                                                                    batch.returns),
                              **learning_rates(m.optimizer), **metrics,
                              sps=len(batch) / (t2 - t0), cpu_s=c2 - c0, rollout_s=t1 - t0,
                              update_s=t2 - t1, time_elapsed=m.elapsed)
                record = _json_safe(record)
                try:
                    go_on = m.events.on_iteration_end(IterationEnd(
                        m.run.path, m.cfg, m.agent, it + 1, m.env_steps, record, batch))
                    kept = m.checkpoint(it + 1)
                    m.completed = it + 1
                    m.status("running", m.completed, return_mean=record["return_mean"])
                    m.events.on_checkpoint(CheckpointSaved(m.run.path, m.cfg, m.completed,
                                                           m.env_steps,
                                                           m.run.last_checkpoint, kept))
                except Exception as exc:
                    gone[m.index] = m.end("failed", f"{type(exc).__name__}: {exc}", exc)
                    continue
                if go_on is False:
                    stop = (f"stopped by the callback {m.events.stopped_by} after "
                            f"iteration {m.completed}")
                    m.run.log(f"{stop}; resume with 'pgscope train --resume {m.run.path}'")
                    gone[m.index] = m.end("interrupted", stop)
            bar.update(sum(len(b) for b, _ in data))
            drop(gone)
    except KeyboardInterrupt:
        for m in live:
            m.end("interrupted", "interrupted by the user (SIGINT/SIGTERM)")
        raise
    except Exception as exc:  # the batch's shared work failed: every member with it
        if not alone:  # a single run's caller gets the exception itself
            traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        for m in live:
            ended[m.index] = m.end("failed", error, exc)
        live = []
    finally:
        bar.close()
    for m in live:
        ended[m.index] = m.end("complete")
    return [ended[m.index] for m in members]


#: Seeds per batch when nobody says otherwise, for ``pgscope train --seeds`` and studies
#: (docs/benchmarks.md, "Seed-batched training": one process's throughput still grows
#: from 8 to 16 seeds; a study halves its batches until every worker has one).
DEFAULT_BATCH_SIZE = 16


def parse_seeds(text: str) -> list[int]:
    """``"0-15"``, ``"0,1,2"`` or a mix (``"0-3,8"``) as a list of distinct seeds."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        raise ConfigError(f"--seeds expects e.g. 0-15 or 0,1,2; got '{text}'.") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs distinct non-negative seeds; got '{text}'.")
    return seeds


def seed_run_dir(out: str | Path, seed: int) -> Path:
    """The run directory of ``seed`` under ``out`` (named as a study names its runs)."""
    return Path(out) / f"seed_{seed}"


def train_seeds(cfg: Config | None, seeds: Sequence[int], out: str | Path, *,
                batch_size: int = DEFAULT_BATCH_SIZE, resume: bool = False,
                progress: bool = True, total_steps: int | None = None
                ) -> list[BatchMember]:
    """Train (or with ``resume`` continue) ``cfg`` for each seed into ``out/seed_<s>/``,
    ``batch_size`` seeds per batch, one batch after the other."""
    if batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size) must be >= 1, got {batch_size}.")
    members: list[BatchMember] = []
    for start in range(0, len(seeds), batch_size):
        group = list(seeds[start:start + batch_size])
        outs = [seed_run_dir(out, s) for s in group]
        cfgs = [] if cfg is None else [dataclasses.replace(cfg, seed=s) for s in group]
        members += train_batch(cfgs, outs, resume=resume, progress=progress,
                               total_steps=total_steps)
    return members


class _Stopped(Exception):
    """A callback asked to stop training."""


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
