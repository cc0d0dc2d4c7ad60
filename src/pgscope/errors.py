"""The one exception type pgscope raises for bad input; the CLI turns it into a clear message."""

from __future__ import annotations


class PgscopeError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ConfigError(PgscopeError):
    """Unknown key, wrong type or out-of-range value in a configuration."""


class EnvError(PgscopeError):
    """The environment id cannot be made."""


class RunDirError(PgscopeError):
    """A run directory is missing, foreign, or holds a different run."""


class CheckpointError(PgscopeError):
    """A checkpoint is corrupt or belongs to another run/architecture."""


class DivergenceError(PgscopeError):
    """NaN or Inf appeared in a loss or a parameter during training."""

    def __init__(self, message: str, iteration: int, where: str) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.where = where


class ProbeError(PgscopeError):
    """Bad probe settings (sample budget, grid) for a probe."""


class DependencyError(PgscopeError):
    """An optional package a feature needs (e.g. wandb) is not installed; the message names
    the command that installs it."""
