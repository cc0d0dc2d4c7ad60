"""The authors' own configurations of Engstrom et al. (2020), "Implementation Matters in Deep
Policy Gradients", as presets: ``ppo-paper``, ``ppo-m-paper``, ``trpo-paper``, ``trpo+-paper``.

Every value comes from the authors' released code, MadryLab/implementation-matters: the
effective value of a key is the base file ``src/MuJoCo.json`` overridden by the config file
``configs/<env>_<algo>.py`` of Hopper (``hopper_*``), Walker2d (``walker_*``) and Humanoid
(``humanoid_*``); ``ppom`` is PPO-M and ``trpo_plus`` TRPO+. A value that differs between
those envs is a :class:`~pgscope.config.ByEnv`, so the presets run on these three env
families only (for another env, give the per-env keys with ``--set``). What each key does
was read from their ``src/policy_gradients/`` (``agent.py``, ``steps.py``, ``models.py``,
``torch_utils.py``, ``custom_env.py``). Each value below cites its source, shortened to
``MuJoCo.json: key`` (the base file) or ``<algo> configs: key`` (the three config files of
that algorithm). A key that the algorithm never reads (a TRPO limit in a PPO preset, the
policy lr of TRPO) is left at pgscope's value.

docs/presets.md lists every key of the authors' configs with its value per env, the pgscope
key it maps to, and what pgscope cannot express (their reward-std normalization variant,
time-limit handling, fresh episodes every iteration, ...).
"""

from __future__ import annotations

from typing import Any

import pgscope.algos.ppo  # noqa: F401 - registers 'ppo', which these presets extend
import pgscope.algos.trpo  # noqa: F401 - registers 'trpo'
from pgscope.algos import add_presets
from pgscope.config import ByEnv

#: The authors' number of iterations (MuJoCo.json: train_steps) and env steps per iteration
#: (MuJoCo.json: t): "1M steps" in the paper is 488 x 2048 = 999,424 env steps.
TRAIN_STEPS = 488
STEPS_PER_ITER = 2048

#: Values every paper preset shares (PPO and TRPO read each of them).
_COMMON: dict[str, Any] = dict(
    total_steps=TRAIN_STEPS * STEPS_PER_ITER,  # MuJoCo.json: train_steps (488) x t (2048);
    # the lr annealing and the KL schedule run over these 488 iterations
    steps_per_iter=STEPS_PER_ITER,  # MuJoCo.json: t
    num_envs=1,  # MuJoCo.json: num_actors
    gamma=0.99,  # MuJoCo.json: gamma
    gae_lambda=0.95,  # MuJoCo.json: lambda (only TRPO+ on Humanoid overrides it)
    epochs=10,  # MuJoCo.json: ppo_epochs and val_epochs (pgscope: one key, both 10)
    minibatches=32,  # MuJoCo.json: num_minibatches (policy and value steps)
    adam_eps=1e-5,  # MuJoCo.json: adam_eps (policy); agent.py: eps=1e-5 (value optimizer)
    value_clip_range=0.2,  # MuJoCo.json: clip_val_eps (read when value_clipping is on)
    hidden=(64, 64),  # models.py: HIDDEN_SIZES (policy), ValueDenseNet's hidden_sizes
    activation="tanh",  # models.py: ACTIVATION = nn.Tanh
    init_log_std=0.0,  # models.py: CtsPolicy.log_stdev starts at zeros
    obs_norm=True,  # MuJoCo.json: norm_states (no config file overrides it)
    reward_clip_bound=10.0,  # MuJoCo.json: clip_rewards (-1 = off in some config files)
    obs_clip_bound=10.0,  # MuJoCo.json: clip_observations (-1 = off in some config files)
    adv_norm=True,  # steps.py: surrogate_reward always normalizes the advantages
    action_clip=False,  # agent.py: multi_actor_step passes the Gaussian sample to
    # env.step unclipped (MuJoCo's ctrlrange bounds the actuators)
    torch_threads=1,  # every config file: cpu=True -> agent.py: torch.set_num_threads(1)
)

#: PPO's own keys (the TRPO keys max_kl, max_kl_final, ... are never read by ppo_step).
_PPO: dict[str, Any] = dict(
    _COMMON,
    ppo_loss="clip",  # MuJoCo.json: mode "ppo" -> steps.py: ppo_step (clipped surrogate)
    clip_eps=0.2,  # MuJoCo.json: clip_eps
    ent_coef=0.0,  # MuJoCo.json: entropy_coeff
    kl_stop=False,  # steps.py: ppo_step runs all ppo_epochs (no early stopping)
    grad_clip=False,  # MuJoCo.json: clip_grad_norm -1, which no PPO config file overrides
)

#: TRPO's own keys (MuJoCo.json; the policy lr, ppo_lr_adam, is never read by trpo_step).
_TRPO: dict[str, Any] = dict(
    _COMMON,
    fisher_fraction=0.1,  # MuJoCo.json: fisher_frac_samples
    cg_iters=10,  # MuJoCo.json: cg_steps
    cg_damping=0.1,  # MuJoCo.json: damping
    backtrack_iters=10,  # MuJoCo.json: max_backtrack
    backtrack_coef=0.5,  # torch_utils.py: backtracking_line_search tries the step x 2**-i
    lr_anneal=False,  # trpo and trpo+ configs: anneal_lr False (value lr constant)
)

PAPER_PRESETS_PPO: dict[str, dict[str, Any]] = {
    "ppo-paper": dict(
        _PPO,
        policy_lr=ByEnv(Hopper=3e-4, Walker2d=4e-4, Humanoid=1.5e-4),  # ppo configs:
        # ppo_lr_adam
        value_lr=ByEnv(Hopper=2.5e-4, Walker2d=3e-4, Humanoid=1e-4),  # ppo configs: val_lr
        value_clip=ByEnv(Hopper=False, Walker2d=True, Humanoid=True),  # ppo configs:
        # value_clipping
        reward_scale=True,  # ppo configs: norm_rewards "returns" (custom_env.py: RewardFilter)
        reward_clip=True,  # MuJoCo.json: clip_rewards 10 (applied by the RewardFilter)
        obs_clip=True,  # MuJoCo.json: clip_observations 10 (applied by the state ZFilter)
        ortho_init=True,  # ppo configs: initialization "orthogonal"
        lr_anneal=True,  # ppo configs: anneal_lr True
    ),
    "ppo-m-paper": dict(
        _PPO,
        policy_lr=ByEnv(Hopper=1.7e-4, Walker2d=1e-4, Humanoid=9e-5),  # ppom configs:
        # ppo_lr_adam
        value_lr=ByEnv(Hopper=4e-4, Walker2d=2e-4, Humanoid=4e-4),  # ppom configs: val_lr
        value_clip=False,  # ppom configs: value_clipping False
        reward_scale=False,  # ppom configs: norm_rewards "none"
        reward_clip=False,  # ppom configs: clip_rewards -1
        obs_clip=False,  # ppom configs: clip_observations -1 (observations still
        # normalized: norm_states stays on)
        ortho_init=False,  # ppom configs: initialization "xavier"
        lr_anneal=False,  # ppom configs: anneal_lr False
    ),
}

PAPER_PRESETS_TRPO: dict[str, dict[str, Any]] = {
    "trpo-paper": dict(
        _TRPO,
        max_kl=ByEnv(Hopper=0.13, Walker2d=0.04, Humanoid=0.07),  # trpo configs: max_kl
        max_kl_final=ByEnv(Hopper=0.13, Walker2d=0.04, Humanoid=0.07),  # trpo configs:
        # max_kl_final (= max_kl: a constant limit)
        value_lr=ByEnv(Hopper=2e-4, Walker2d=3e-4, Humanoid=3e-4),  # trpo configs: val_lr
        value_clip=False,  # trpo configs: value_clipping False
        reward_scale=False,  # trpo configs: norm_rewards "none"
        reward_clip=False,  # trpo configs: clip_rewards -1
        obs_clip=False,  # trpo configs: clip_observations -1 (norm_states stays on)
        ortho_init=False,  # trpo configs: initialization "xavier"
        grad_clip=False,  # MuJoCo.json: clip_grad_norm -1
    ),
    "trpo+-paper": dict(
        _TRPO,
        max_kl=ByEnv(Hopper=0.04, Walker2d=0.07, Humanoid=0.1),  # trpo_plus configs: max_kl
        # constant, as their code ran it: their configs set max_kl_final (Hopper 0.07,
        # Walker2d 0.04, Humanoid 0.05), but agent.py's `self.MAX_KL += self.MAX_KL_INCREMENT`
        # stores the sum on the Trainer (it has __getattr__, no __setattr__), while
        # steps.py's trpo_step reads params.MAX_KL, which never changes. The schedule the
        # files describe is the preset trpo+-paper-files.
        max_kl_final=0.0,
        value_lr=ByEnv(Hopper=2e-4, Walker2d=1e-4, Humanoid=5e-5),  # trpo_plus configs:
        # val_lr
        value_clip=ByEnv(Hopper=False, Walker2d=False, Humanoid=True),  # trpo_plus
        # configs: value_clipping (steps.py: value_step reads it for TRPO too)
        ortho_init=ByEnv(Hopper=True, Walker2d=True, Humanoid=False),  # trpo_plus
        # configs: initialization ("xavier" on Humanoid)
        gae_lambda=ByEnv(Hopper=0.95, Walker2d=0.95, Humanoid=0.85),  # MuJoCo.json:
        # lambda; configs/humanoid_trpo_plus.py: lambda 0.85
        reward_scale=True,  # trpo_plus configs: norm_rewards "returns"
        reward_clip=True,  # MuJoCo.json: clip_rewards 10
        obs_clip=True,  # MuJoCo.json: clip_observations 10
        grad_clip=False,  # trpo_plus configs set clip_grad_norm, but only steps.py's
        # ppo_step reads it: trpo_step and value_step never clip a gradient
        max_grad_norm=ByEnv(Hopper=1.0, Walker2d=1.0, Humanoid=0.5),  # trpo_plus configs:
        # clip_grad_norm (recorded; in effect only with --set grad_clip=true)
    ),
}

#: ``trpo+-paper`` with the KL-limit schedule its config files describe (linear from
#: max_kl to max_kl_final over the run, :func:`pgscope.algos.trpo.kl_limit`), which the
#: authors' code never applied: what TRPO+ would have been had it run as configured.
PAPER_PRESETS_TRPO["trpo+-paper-files"] = dict(
    PAPER_PRESETS_TRPO["trpo+-paper"],
    max_kl_final=ByEnv(Hopper=0.07, Walker2d=0.04, Humanoid=0.05),  # trpo_plus configs:
    # max_kl_final
)

add_presets("ppo", PAPER_PRESETS_PPO)
add_presets("trpo", PAPER_PRESETS_TRPO)

#: Every paper preset by name.
PAPER_PRESETS: dict[str, dict[str, Any]] = {**PAPER_PRESETS_PPO, **PAPER_PRESETS_TRPO}

__all__ = ["PAPER_PRESETS", "PAPER_PRESETS_PPO", "PAPER_PRESETS_TRPO", "STEPS_PER_ITER",
           "TRAIN_STEPS"]
