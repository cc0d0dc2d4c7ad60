"""Run directories and checkpoints: crash-safe, append-only, loadable without unpickling.

Layout of a run directory::

    config.json          resolved config, its hash, library versions
    metrics.jsonl        one JSON object per finished iteration, flushed as it ends
    status.json          running | complete | diverged (with the error, if any)
    checkpoints/last.pt  the latest iteration (written atomically every iteration)
    checkpoints/iter_000010.pt ...   kept every ``checkpoint_every`` iterations

Order of writes per iteration: metrics line first, then checkpoint. A kill between the two
leaves one metrics line past the checkpoint, which ``--resume`` truncates and recomputes, so
no iteration is ever duplicated or missing.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from pgscope import __version__
from pgscope.agent import Agent, build_agent, spaces_signature
from pgscope.config import Config, config_hash
from pgscope.errors import CheckpointError, RunDirError

CHECKPOINT_FORMAT = "pgscope-checkpoint"
CHECKPOINT_VERSION = 1


def library_versions() -> dict[str, str]:
    import mujoco  # noqa: PLC0415 - optional at import time of pgscope
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gymnasium": gym.__version__,
        "mujoco": mujoco.__version__,
        "numpy": numpy.__version__,
        "pgscope": __version__,
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    status_path = property(lambda self: self.path / "status.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")

    @classmethod
    def create(cls, path: Path, cfg: Config) -> RunDir:
        """Create a new run directory; refuse one that holds anything else."""
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            if run.config_path.exists():
                other = run.read_config()
                if config_hash(other) == config_hash(cfg):
                    raise RunDirError(
                        f"'{path}' already holds this run; continue it with "
                        f"'pgscope train --resume {path}' or choose another --out."
                    )
                raise RunDirError(
                    f"'{path}' already holds a different run (preset {other.preset}, env "
                    f"{other.env_id}, seed {other.seed}); choose another --out directory."
                )
            raise RunDirError(
                f"'{path}' is not empty and is not a pgscope run; choose another --out directory."
            )
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.config_path, {
            "config": cfg.to_dict(),
            "config_hash": config_hash(cfg),
            "versions": library_versions(),
        })
        run.metrics_path.touch()
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"run directory '{path}' does not exist.")
        if not run.config_path.exists():
            raise RunDirError(f"'{path}' is not a pgscope run directory (no config.json).")
        run.read_config()
        return run

    def read_config(self) -> Config:
        try:
            data = json.loads(self.config_path.read_text())
            return Config.from_dict(data["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunDirError(f"'{self.config_path}' is not a valid pgscope config ({exc}).") \
                from None

    # --- metrics --------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete metrics line (a line cut short by a kill is ignored)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_metrics(self, iterations_done: int) -> None:
        """Keep only the lines of iterations 1..iterations_done (atomic rewrite)."""
        keep = [r for r in self.read_metrics() if r["iteration"] <= iterations_done]
        atomic_write_bytes(self.metrics_path,
                           "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write_status(self, state: str, **extra: Any) -> None:
        atomic_write_json(self.status_path, {"state": state, **extra})

    def read_status(self) -> dict[str, Any]:
        if not self.status_path.exists():
            return {"state": "unknown"}
        return json.loads(self.status_path.read_text())

    def checkpoints(self) -> dict[int, Path]:
        """Kept checkpoints by iteration number."""
        out = {}
        for p in self.checkpoint_dir.glob("iter_*.pt"):
            m = re.fullmatch(r"iter_(\d+)\.pt", p.name)
            if m:
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(path: Path, agent: Agent, *, iteration: int, env_steps: int,
                    optimizer: torch.optim.Optimizer, extra: dict[str, Any],
                    spaces: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename): policy, value net, optimizer,
    normalization state and whatever ``extra`` training state the trainer needs."""
    cfg = agent.config
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "spaces": spaces,
        "iteration": iteration,
        "env_steps": env_steps,
        "policy": agent.policy.state_dict(),
        "value_net": agent.value_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "preprocessor": agent.preprocessor.state_dict(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check it is pgscope's."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a safe pgscope checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a pgscope checkpoint.")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint version {ckpt.get('version')}; this pgscope reads "
            f"version {CHECKPOINT_VERSION}."
        )
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: Path, spaces: dict[str, Any],
                     cfg: Config | None = None) -> None:
    """Refuse a checkpoint from another env/architecture (or, given ``cfg``, another run)."""
    if ckpt["spaces"] != spaces:
        raise CheckpointError(
            f"checkpoint '{path}' was made for spaces {ckpt['spaces']}, not {spaces} "
            f"(env {ckpt['config'].get('env_id')})."
        )
    if cfg is not None and checkpoint_config_hash(ckpt) != config_hash(cfg):
        raise CheckpointError(
            f"checkpoint '{path}' belongs to a different run (config hash "
            f"{checkpoint_config_hash(ckpt)} != {config_hash(cfg)})."
        )


def checkpoint_config_hash(ckpt: dict[str, Any]) -> str:
    """The hash of a checkpoint's config under the current schema (keys added to
    :class:`Config` since it was written take their defaults on both sides)."""
    return config_hash(Config.from_dict(ckpt["config"]))


def restore_agent(agent: Agent, ckpt: dict[str, Any], path: Path) -> None:
    try:
        agent.policy.load_state_dict(ckpt["policy"])
        agent.value_net.load_state_dict(ckpt["value_net"])
        agent.preprocessor.load_state_dict(ckpt["preprocessor"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this architecture: {str(exc).splitlines()[0]}"
        ) from None


def resolve_checkpoint(path: Path, iteration: int | None = None) -> Path:
    """A checkpoint file from a file path or a run directory (latest, or ``iteration``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunDirError(f"'{path}' is neither a checkpoint file nor a run directory.")
    run = RunDir(path)
    if iteration is None:
        if not run.last_checkpoint.exists():
            raise RunDirError(f"run directory '{path}' has no checkpoint yet.")
        return run.last_checkpoint
    kept = run.checkpoints()
    if iteration not in kept:
        raise RunDirError(
            f"run '{path}' has no checkpoint of iteration {iteration}; kept: "
            f"{', '.join(map(str, kept)) or 'none'}."
        )
    return kept[iteration]


def load_agent(path: str | Path, iteration: int | None = None) -> Agent:
    """Load an agent from a checkpoint file or a run directory (its latest checkpoint, or
    the one kept at ``iteration``). Nothing is unpickled."""
    from pgscope.envs import make_env

    ckpt_path = resolve_checkpoint(Path(path), iteration)
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config.from_dict(ckpt["config"])
    if Path(path).is_dir():  # a run directory: its checkpoints must be its own
        run_cfg = RunDir.open(Path(path)).read_config()
        if config_hash(run_cfg) != checkpoint_config_hash(ckpt):
            raise CheckpointError(
                f"checkpoint '{ckpt_path}' belongs to a different run (env {cfg.env_id}, "
                f"preset {cfg.preset}) than '{path}' (env {run_cfg.env_id}, preset "
                f"{run_cfg.preset})."
            )
    env = make_env(cfg.env_id)
    try:
        spaces = spaces_signature(env.observation_space, env.action_space)
        check_compatible(ckpt, ckpt_path, spaces)
        agent = build_agent(cfg, env.observation_space, env.action_space)
    finally:
        env.close()
    restore_agent(agent, ckpt, ckpt_path)
    return agent
