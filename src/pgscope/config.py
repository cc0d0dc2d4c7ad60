"""Configuration: one flat, typed dataclass; presets are nothing but sets of its values.

Resolution order (later wins): dataclass defaults -> preset -> per-env defaults (learning
rates, TRPO KL limit; docs/design.md section 1.4) -> the preset's own per-env values
(:class:`ByEnv`) -> the user's overrides. :func:`make_config` does all of it and validates
the result, so every error names the key and what is allowed.

The presets belong to the algorithms (each algorithm module registers its own, see
:mod:`pgscope.algos`); :data:`PRESETS` is a read-only view of them. Keys marked
``observes`` (the probe schedule, evaluation during training, checkpoint keeping,
logging) only watch a run: they are left out of its identity (:func:`config_hash`).
Components that own keys may add checks with :func:`register_check` (the probes check the
probe schedule).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgscope.errors import ConfigError


def _choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


#: Field metadata of the keys that only observe a run (left out of its identity).
OBSERVES: dict[str, Any] = {"observes": True}


@dataclass
class Config:
    """Every hyperparameter and code-level optimization switch of a run.

    Build one with :func:`make_config` (preset + env + overrides) rather than directly,
    so that per-env defaults and validation are applied.
    """

    # --- the run -----------------------------------------------------------------------
    preset: str = "ppo"
    env_id: str = "Hopper-v5"
    seed: int = 0
    total_steps: int = 1_000_000
    num_envs: int = 1
    steps_per_iter: int = 2048  # env steps per iteration, summed over the envs
    # --- algorithm ---------------------------------------------------------------------
    algo: str = "ppo"  # a registered algorithm (pgscope.algos); set by the preset
    ppo_loss: str = field(default="clip", metadata=_choice("clip", "kl"))
    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 10  # PPO policy epochs, and the value-net epochs of every algorithm
    minibatches: int = 32
    policy_lr: float = 3e-4
    value_lr: float = 2.5e-4
    adam_eps: float = 1e-5
    clip_eps: float = 0.2  # PPO ratio clip; ppo-noclip sets 1e32
    target_kl: float = 0.01  # ppo-kl penalty target and KL early-stopping target
    kl_beta_init: float = 1.0  # ppo-kl initial penalty coefficient
    # TRPO
    max_kl: float = 0.13
    max_kl_final: float = 0.0  # KL limit of the last iteration, reached linearly from
    # max_kl (algos.trpo.kl_limit); 0 keeps max_kl throughout
    cg_iters: int = 10
    cg_damping: float = 0.1
    fisher_fraction: float = 0.1
    backtrack_iters: int = 10
    backtrack_coef: float = 0.5
    # --- networks ----------------------------------------------------------------------
    hidden: tuple[int, ...] = (64, 64)
    init_log_std: float = 0.0
    # --- the nine code-level optimizations (docs/design.md 1.5) -----------------------
    value_clip: bool = True  # 1. value-function clipping
    value_clip_range: float = 0.2
    reward_scale: bool = True  # 2. divide rewards by running std of discounted return
    ortho_init: bool = True  # 3. orthogonal init with layer scaling (else Xavier)
    lr_anneal: bool = True  # 4. linear Adam learning-rate annealing to 0
    reward_clip: bool = True  # 5. clip (scaled) rewards to [-bound, bound]
    reward_clip_bound: float = 10.0
    obs_norm: bool = True  # 6. running mean/std observation normalization
    obs_clip: bool = True  # 7. clip (normalized) observations to [-bound, bound]
    obs_clip_bound: float = 10.0
    activation: str = field(default="tanh", metadata=_choice("tanh", "relu"))  # 8.
    grad_clip: bool = True  # 9. global gradient-norm clipping (each network separately)
    max_grad_norm: float = 0.5
    # --- further switches --------------------------------------------------------------
    adv_norm: bool = True  # per-minibatch advantage normalization
    ent_coef: float = 0.0  # entropy bonus; 0 switches it off
    value_dr3_coef: float = 0.0  # DR3 feature co-adaptation penalty on the value loss,
    # c x mean |phi(s) . phi(s')| over pairs whose s' is not terminal (docs/dr3.md); 0: off
    value_dr3_form: str = field(default="abs", metadata=_choice("abs", "signed"))  # the
    # term's per-pair value: |phi(s) . phi(s')| (the authors' code) or the signed dot
    kl_stop: bool = False  # stop the epochs once mean KL > 1.5 * target_kl
    action_clip: bool = True  # clip actions to the bounds before env.step
    reward_multiplier: float = 1.0  # the learner sees k x reward (Henderson et al.'s
    # reward-scale experiment); logged returns stay in the env's own units
    # --- probes scheduled during training (0 = never); they only observe ------------------
    probe_every: int = field(default=0, metadata=OBSERVES)  # every K iterations, into
    # DIR/probes/iter_XXXXXX/
    probe_kinds: str = field(default="gradients,values,trust-region", metadata=OBSERVES)
    probe_sizes: tuple[int, ...] = field(default=(100, 1000, 10_000), metadata=OBSERVES)
    probe_k: int = field(default=5, metadata=OBSERVES)
    probe_true_pairs: int = field(default=100_000, metadata=OBSERVES)
    probe_value_pairs: int = field(default=20_000, metadata=OBSERVES)
    # critic-feature metrics (feature_dot, ...) on the batch every K iterations; 0 = never
    features_every: int = field(default=1, metadata=OBSERVES)
    # --- evaluation during training (pgscope.periodic_eval; eval_* metrics) ---------------
    eval_every: int = field(default=0, metadata=OBSERVES)  # every K iterations and at the
    # last one, on separate envs with frozen statistics; 0 = never
    eval_episodes: int = field(default=10, metadata=OBSERVES)  # episodes per evaluation
    eval_deterministic: bool = field(default=True, metadata=OBSERVES)  # the mean/mode
    # action (as pgscope evaluate); False samples
    # --- bookkeeping and logging -------------------------------------------------------
    # keep checkpoints/iter_XXXXXX.pt every K iterations
    checkpoint_every: int = field(default=10, metadata=OBSERVES)
    tensorboard: bool = field(default=False, metadata=OBSERVES)  # DIR/tensorboard/ events
    csv: bool = field(default=False, metadata=OBSERVES)  # DIR/metrics.csv besides the JSONL
    wandb: bool = field(default=False, metadata=OBSERVES)  # a W&B run (pip install wandb)
    torch_threads: int = 1
    heldout_kl: bool = True  # also report KL on the previous iteration's states

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild a config saved with :meth:`to_dict` (unknown keys are an error)."""
        _check_keys(data.keys())
        values = dict(data)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        coef = values.get("value_dr3_coef", 0)
        if "value_dr3_form" not in values and isinstance(coef, (int, float)) and coef > 0:
            values["value_dr3_form"] = "signed"  # saved before the key: the signed form ran
        cfg = cls(**values)
        validate(cfg)
        return cfg

    @property
    def num_iterations(self) -> int:
        return -(-self.total_steps // self.steps_per_iter)

    @property
    def steps_per_env(self) -> int:
        return self.steps_per_iter // self.num_envs


#: The code-level optimizations switched off (the minimal presets start from this).
OPTIMIZATIONS_OFF: dict[str, Any] = dict(
    value_clip=False,
    reward_scale=False,
    ortho_init=False,
    lr_anneal=False,
    reward_clip=False,
    obs_norm=False,
    obs_clip=False,
    grad_clip=False,
)


#: Where presets come from: the algorithm registry registers itself
#: (:func:`register_presets`), so this module imports nothing of the layers above it.
_PRESET_SOURCES: list[Callable[[], Mapping[str, dict[str, Any]]]] = []


def register_presets(source: Callable[[], Mapping[str, dict[str, Any]]]) -> None:
    """Make the presets ``source()`` returns (name -> config values, ``algo`` included)
    part of :data:`PRESETS` (:mod:`pgscope.algos` registers its registry's presets)."""
    if source not in _PRESET_SOURCES:
        _PRESET_SOURCES.append(source)


class _Presets(Mapping[str, Mapping[str, Any]]):
    """Every registered algorithm's presets by name (docs/design.md section 1.3): each is
    only a set of config values, ``algo`` included. A view of :mod:`pgscope.algos`."""

    @staticmethod
    def _all() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for source in _PRESET_SOURCES:
            out.update(source())
        return out

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"PRESETS({', '.join(self)})"


#: Every preset (of every registered algorithm) by name.
PRESETS: Mapping[str, Mapping[str, Any]] = _Presets()

#: Per-env learning rates (policy, value) and TRPO KL limits ("Closer Look" Table 1).
ENV_DEFAULTS: dict[str, dict[str, float]] = {
    "Hopper": dict(policy_lr=3e-4, value_lr=2.5e-4, max_kl=0.13),
    "Walker2d": dict(policy_lr=4e-4, value_lr=3e-4, max_kl=0.04),
    "Humanoid": dict(policy_lr=1.5e-4, value_lr=1e-4, max_kl=0.07),
}


def env_base_name(env_id: str) -> str:
    """'Hopper-v5' -> 'Hopper', 'my_module:ns/Thing-v0' -> 'Thing'."""
    return re.sub(r"-v\d+$", "", env_id.split(":")[-1].split("/")[-1])


def env_family(env_id: str) -> str | None:
    """'Hopper-v5' -> 'Hopper'; None when the env has no per-env defaults."""
    name = env_base_name(env_id)
    return name if name in ENV_DEFAULTS else None


class ByEnv(dict[str, Any]):
    """A preset value that depends on the env family: ``ByEnv(Hopper=2e-4, Walker2d=3e-4)``.

    :func:`make_config` picks the value of the env's family (the env id without its
    version, as :func:`env_base_name` gives it) after :data:`ENV_DEFAULTS`, so it wins over
    them; for an env of another family every such key must be given as an override."""


def resolve_by_env(preset: str, values: Mapping[str, Any], env_id: str,
                   given: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``preset``'s :class:`ByEnv` keys for ``env_id``; a key the preset has
    no value of for this env must be in ``given`` (the user's overrides)."""
    family = env_base_name(env_id)
    per_env = {k: v for k, v in values.items() if isinstance(v, ByEnv)}
    missing = [k for k, v in per_env.items() if family not in v and k not in given]
    if missing:
        known = sorted({f for v in per_env.values() for f in v})
        raise ConfigError(
            f"preset '{preset}' sets {', '.join(missing)} per env, for {', '.join(known)} "
            f"only; for '{env_id}' give {'it' if len(missing) == 1 else 'each'} yourself "
            f"(e.g. --set {missing[0]}=...).")
    return {k: v[family] for k, v in per_env.items() if family in v}


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

#: Keys that only observe a run; the rest is what changes training (its identity).
OBSERVER_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config)
                                       if f.metadata.get("observes"))

_CHECKS: list[Callable[[Config], None]] = []


def register_check(check: Callable[[Config], None]) -> None:
    """Add ``check(cfg)`` to :func:`validate`: it raises :class:`ConfigError` naming the key
    (a component that owns config keys, e.g. the probe schedule, checks them itself)."""
    if check not in _CHECKS:
        _CHECKS.append(check)


#: Names stable-baselines3 and CleanRL give to what pgscope calls otherwise: an unknown
#: key that is one of these is answered with pgscope's key (and how the meaning differs).
OTHER_LIBRARIES: dict[str, str] = {
    "n_steps": "steps_per_iter (SB3's n_steps is per env: steps_per_iter = n_steps x "
               "num_envs)",
    "num_steps": "steps_per_iter (CleanRL's num_steps is per env: steps_per_iter = "
                 "num_steps x num_envs)",
    "learning_rate": "policy_lr and value_lr (one learning rate each)",
    "lr": "policy_lr and value_lr (one learning rate each)",
    "n_epochs": "epochs", "update_epochs": "epochs",
    "batch_size": "minibatches (the number of minibatches per epoch: SB3's batch_size of "
                  "64 with 2,048 steps is minibatches = 32)",
    "num_minibatches": "minibatches",
    "clip_range": "clip_eps", "clip_coef": "clip_eps",
    "clip_range_vf": "value_clip and value_clip_range", "clip_vloss": "value_clip",
    "vf_coef": "nothing: pgscope's policy and value nets are separate, each with its own "
               "optimizer group, so there is no value-loss weight (set value_lr)",
    "norm_adv": "adv_norm", "normalize_advantage": "adv_norm", "anneal_lr": "lr_anneal",
    "total_timesteps": "total_steps",
}


def _check_keys(keys: Any) -> None:
    for key in keys:
        if key not in _FIELDS:
            if key in OTHER_LIBRARIES:
                raise ConfigError(f"unknown config key '{key}': in pgscope that is "
                                  f"{OTHER_LIBRARIES[key]}.")
            close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Valid keys: {', '.join(sorted(_FIELDS))}."
            )


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset '{preset}'.{hint} Presets: {', '.join(PRESETS)}.")


def parse_value(key: str, text: str) -> Any:
    """Parse the string of a ``--set key=value`` into the key's declared type."""
    _check_keys([key])
    ftype = _FIELDS[key].type
    text = text.strip()
    try:
        if ftype == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if ftype == "int":
            number = float(text) if any(c in text for c in ".eE") else int(text)
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if ftype == "float":
            return float(text)
        if ftype.startswith("tuple"):
            return tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
        return text
    except ValueError:
        raise ConfigError(
            f"config key '{key}' expects a value of type {ftype}, got '{text}'."
        ) from None


def _check_type(key: str, value: Any) -> Any:
    ftype = str(_FIELDS[key].type)
    expected: Any = {"bool": bool, "int": int, "float": (int, float), "str": str}.get(ftype)
    if expected is None:  # tuple[int, ...]
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, expected) and not (ftype != "bool" and isinstance(value, bool))
        if ftype == "float" and ok:
            value = float(value)
    if not ok:
        raise ConfigError(
            f"config key '{key}' expects {ftype}, got {value!r} ({type(value).__name__})."
        )
    return value


def validate(cfg: Config) -> None:
    """Check types, ranges and choices; raise :class:`ConfigError` naming the key."""
    for name, f in _FIELDS.items():
        setattr(cfg, name, _check_type(name, getattr(cfg, name)))
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise ConfigError(
                f"config key '{name}' must be one of {', '.join(choices)}; "
                f"got '{getattr(cfg, name)}'."
            )

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    _check_preset(cfg.preset)
    for key in ("total_steps", "num_envs", "steps_per_iter", "epochs", "minibatches",
                "checkpoint_every", "torch_threads", "cg_iters", "backtrack_iters"):
        need(getattr(cfg, key) >= 1, f"config key '{key}' must be >= 1, got {getattr(cfg, key)}.")
    need(cfg.seed >= 0, f"config key 'seed' must be >= 0, got {cfg.seed}.")
    need(cfg.probe_every >= 0, f"config key 'probe_every' must be >= 0, got {cfg.probe_every}.")
    need(cfg.steps_per_iter % cfg.num_envs == 0,
         f"steps_per_iter ({cfg.steps_per_iter}) must be a multiple of num_envs ({cfg.num_envs}).")
    need(cfg.minibatches <= cfg.steps_per_iter,
         f"minibatches ({cfg.minibatches}) cannot exceed steps_per_iter ({cfg.steps_per_iter}).")
    for key in ("gamma", "gae_lambda", "fisher_fraction"):
        v = getattr(cfg, key)
        need(0.0 < v <= 1.0 if key != "gae_lambda" else 0.0 <= v <= 1.0,
             f"config key '{key}' must lie in (0, 1], got {v}.")
    for key in ("policy_lr", "value_lr", "adam_eps", "clip_eps", "target_kl", "max_kl",
                "value_clip_range", "reward_clip_bound", "obs_clip_bound", "max_grad_norm",
                "kl_beta_init", "backtrack_coef", "reward_multiplier"):
        v = getattr(cfg, key)
        need(v > 0 and math.isfinite(v),
             f"config key '{key}' must be a positive finite number, got {v}.")
    need(cfg.backtrack_coef < 1, f"backtrack_coef must be < 1, got {cfg.backtrack_coef}.")
    need(cfg.ent_coef >= 0, f"config key 'ent_coef' must be >= 0, got {cfg.ent_coef}.")
    need(cfg.value_dr3_coef >= 0,
         f"config key 'value_dr3_coef' must be >= 0 (0 = off), got {cfg.value_dr3_coef}.")
    need(cfg.features_every >= 0,
         f"config key 'features_every' must be >= 0 (0 = never), got {cfg.features_every}.")
    need(cfg.eval_every >= 0,
         f"config key 'eval_every' must be >= 0 (iterations between evaluations; 0 = never), "
         f"got {cfg.eval_every}.")
    need(cfg.eval_episodes >= 1,
         f"config key 'eval_episodes' must be >= 1 (episodes per evaluation), got "
         f"{cfg.eval_episodes}.")
    need(cfg.cg_damping >= 0, f"config key 'cg_damping' must be >= 0, got {cfg.cg_damping}.")
    need(cfg.max_kl_final >= 0,
         f"config key 'max_kl_final' must be >= 0 (0 = no annealing), got {cfg.max_kl_final}.")
    need(len(cfg.hidden) >= 1 and all(h >= 1 for h in cfg.hidden),
         f"config key 'hidden' needs at least one positive layer width, got {cfg.hidden}.")
    need(bool(cfg.env_id), "an env id is required.")
    for name, f in _FIELDS.items():
        if f.type == "float":
            v = getattr(cfg, name)
            need(math.isfinite(v), f"config key '{name}' must be a finite number, got {v}.")
    need(cfg.seed < 2**32, f"config key 'seed' must be below 2**32, got {cfg.seed}.")
    for check in _CHECKS:  # registered: the algorithm registry's, the probe schedule's
        check(cfg)


def make_config(
    preset: str = "ppo",
    env_id: str = "Hopper-v5",
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Config:
    """Resolve a preset for an env, apply overrides (typed values or strings), validate.

    >>> cfg = make_config("ppo", "Walker2d-v5", {"seed": "3"})
    >>> cfg.policy_lr, cfg.seed
    (0.0004, 3)
    """
    _check_preset(preset)
    user = dict(overrides or {})
    user.update(kwargs)
    _check_keys(user)
    for key in ("preset", "env_id"):
        if key in user:
            raise ConfigError(f"'{key}' is chosen by the preset/env arguments (--preset/--env), "
                              "not by an override.")
    preset_values = PRESETS[preset]
    values = {k: v for k, v in preset_values.items() if not isinstance(v, ByEnv)}
    family = env_family(env_id)
    if family:
        values.update(ENV_DEFAULTS[family])
    values.update(resolve_by_env(preset, preset_values, env_id, user))
    for key, value in user.items():
        values[key] = parse_value(key, value) if isinstance(value, str) and \
            _FIELDS[key].type != "str" else value
    values.update(preset=preset, env_id=env_id)
    cfg = Config(**values)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["lr=1e-3", "hidden=32,32"]`` into a typed dict, with clear errors."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        key, text = item.split("=", 1)
        key = key.strip()
        out[key] = parse_value(key, text)
    return out


def training_dict(cfg: Config) -> dict[str, Any]:
    """The config's values that change training: every key but :data:`OBSERVER_KEYS`."""
    return {k: v for k, v in cfg.to_dict().items() if k not in OBSERVER_KEYS}


def config_hash(cfg: Config) -> str:
    """A stable hash of what the config makes training do (:func:`training_dict`): keys that
    only observe the run (probe schedule, checkpoint keeping, logging) do not change it.
    :func:`pgscope.run.run_identity` leaves ``total_steps`` out as well."""
    text = json.dumps(training_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "Config",
    "PRESETS",
    "ENV_DEFAULTS",
    "ByEnv",
    "make_config",
    "parse_overrides",
    "parse_value",
    "validate",
    "config_hash",
    "env_family",
    "env_base_name",
    "OBSERVER_KEYS",
    "OPTIMIZATIONS_OFF",
    "register_check",
    "training_dict",
]
