"""Config resolution (preset -> per-env defaults -> overrides), presets, validation errors,
``--set`` parsing and serialization (docs/design.md sections 1.3-1.4)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pgscope.config import (
    OTHER_LIBRARIES,
    PRESETS,
    Config,
    config_hash,
    env_family,
    make_config,
    parse_overrides,
    parse_value,
)
from pgscope.errors import ConfigError, PgscopeError

NINE = ("value_clip", "reward_scale", "ortho_init", "lr_anneal", "reward_clip", "obs_norm",
        "obs_clip", "grad_clip")  # the eight boolean switches of the nine (plus activation)


# resolution order -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env_id, policy_lr, value_lr, max_kl",
    [
        ("Hopper-v5", 3e-4, 2.5e-4, 0.13),
        ("Walker2d-v5", 4e-4, 3e-4, 0.04),
        ("Humanoid-v5", 1.5e-4, 1e-4, 0.07),
        ("Walker2d-v4", 4e-4, 3e-4, 0.04),
    ],
)
@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_per_env_defaults(preset, env_id, policy_lr, value_lr, max_kl):
    cfg = make_config(preset, env_id)
    assert (cfg.policy_lr, cfg.value_lr, cfg.max_kl) == (policy_lr, value_lr, max_kl)
    assert (cfg.preset, cfg.env_id) == (preset, env_id)


def test_env_without_defaults_keeps_dataclass_defaults():
    cfg = make_config("ppo", "CartPole-v1")
    assert env_family("CartPole-v1") is None
    assert (cfg.policy_lr, cfg.value_lr, cfg.max_kl) == (3e-4, 2.5e-4, 0.13)
    assert env_family("Humanoid-v5") == "Humanoid"


def test_override_beats_env_default_and_preset():
    cfg = make_config("ppo", "Walker2d-v5", {"policy_lr": 1e-3, "max_kl": 0.5})
    assert cfg.policy_lr == 1e-3 and cfg.max_kl == 0.5
    assert cfg.value_lr == 3e-4  # the other env default stays
    cfg = make_config("trpo", "Humanoid-v5", {"value_lr": "2e-3", "ortho_init": "true"})
    assert cfg.value_lr == 2e-3 and cfg.max_kl == 0.07
    assert cfg.ortho_init is True  # the preset had it off
    cfg = make_config("ppo-m", "Hopper-v5", seed=7, value_clip=True)  # keyword overrides
    assert cfg.seed == 7 and cfg.value_clip is True and cfg.reward_scale is False


def test_typed_and_string_overrides_agree():
    a = make_config("ppo", "Walker2d-v5", {"seed": "3", "hidden": "32,32", "gamma": "0.98"})
    b = make_config("ppo", "Walker2d-v5", {"seed": 3, "hidden": [32, 32], "gamma": 0.98})
    assert a == b
    assert a.hidden == (32, 32) and isinstance(a.hidden, tuple)
    assert make_config("ppo", overrides={"gamma": 1}).gamma == 1.0  # int accepted for float


# presets -------------------------------------------------------------------------------------
def test_ppo_preset_has_all_optimizations_on():
    cfg = make_config("ppo", "Hopper-v5")
    assert all(getattr(cfg, k) is True for k in NINE)
    assert cfg.activation == "tanh"
    assert (cfg.algo, cfg.ppo_loss, cfg.clip_eps) == ("ppo", "clip", 0.2)
    assert (cfg.reward_clip_bound, cfg.obs_clip_bound, cfg.max_grad_norm) == (10.0, 10.0, 0.5)
    assert (cfg.steps_per_iter, cfg.gamma, cfg.gae_lambda, cfg.epochs, cfg.minibatches,
            cfg.adam_eps, cfg.ent_coef) == (2048, 0.99, 0.95, 10, 32, 1e-5, 0.0)
    assert (cfg.cg_iters, cfg.cg_damping, cfg.fisher_fraction, cfg.backtrack_iters) == \
        (10, 0.1, 0.1, 10)


@pytest.mark.parametrize("preset", ["ppo-m", "trpo"])
def test_minimal_presets_have_optimizations_off(preset):
    cfg = make_config(preset, "Hopper-v5")
    assert all(getattr(cfg, k) is False for k in NINE), {k: getattr(cfg, k) for k in NINE}
    assert cfg.algo == ("ppo" if preset == "ppo-m" else "trpo")


def test_variant_presets():
    noclip = make_config("ppo-noclip", "Hopper-v5")
    assert noclip.clip_eps == 1e32 and noclip.ppo_loss == "clip"
    assert all(getattr(noclip, k) is True for k in NINE)
    kl = make_config("ppo-kl", "Hopper-v5")
    assert (kl.algo, kl.ppo_loss, kl.target_kl, kl.kl_beta_init) == ("ppo", "kl", 0.01, 1.0)
    plus = make_config("trpo+", "Hopper-v5")
    assert plus.algo == "trpo"
    for key in ("reward_scale", "obs_norm", "ortho_init", "grad_clip"):
        assert getattr(plus, key) is True, key
    assert plus.lr_anneal is False and plus.value_clip is False
    assert set(PRESETS) == {"ppo", "ppo-m", "ppo-noclip", "ppo-kl", "a2c", "trpo", "trpo+",
                            "ppo-paper", "ppo-m-paper", "trpo-paper", "trpo+-paper",
                            "trpo+-paper-files"}


# errors ---------------------------------------------------------------------------------------
def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'polcy_lr'.*Did you mean policy_lr"):
        make_config("ppo", "Hopper-v5", {"polcy_lr": 1e-3})
    with pytest.raises(ConfigError, match="Did you mean .*policy_lr"):
        parse_overrides(["polcy_lr=1e-3"])
    assert issubclass(ConfigError, PgscopeError)


def test_wrong_type_errors_name_key_and_type():
    with pytest.raises(ConfigError, match=r"'epochs' expects a value of type int, got 'abc'"):
        parse_overrides(["epochs=abc"])
    with pytest.raises(ConfigError, match="'epochs' expects"):
        make_config("ppo", "Hopper-v5", {"epochs": "abc"})
    with pytest.raises(ConfigError, match=r"'epochs' expects int, got 2.5"):
        make_config("ppo", "Hopper-v5", {"epochs": 2.5})
    with pytest.raises(ConfigError, match="'total_steps' expects"):
        parse_overrides(["total_steps=1.5"])  # not an integer
    with pytest.raises(ConfigError, match="'value_clip' expects"):
        parse_overrides(["value_clip=maybe"])
    with pytest.raises(ConfigError, match="'gamma' expects float"):
        make_config("ppo", "Hopper-v5", {"gamma": True})  # a bool is not a number here
    with pytest.raises(ConfigError, match="'obs_norm' expects bool"):
        make_config("ppo", "Hopper-v5", {"obs_norm": 1})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gamma": 1.5}, r"'gamma' must lie in \(0, 1\], got 1.5"),
        ({"gamma": 0.0}, r"'gamma' must lie in \(0, 1\]"),
        ({"epochs": 0}, "'epochs' must be >= 1, got 0"),
        ({"steps_per_iter": 100, "num_envs": 3},
         r"steps_per_iter \(100\) must be a multiple of num_envs \(3\)"),
        ({"minibatches": 64, "steps_per_iter": 32}, r"minibatches \(64\) cannot exceed"),
        ({"policy_lr": -1e-3}, "'policy_lr' must be a positive finite number"),
        ({"clip_eps": float("inf")}, "'clip_eps' must be a positive finite number"),
        ({"hidden": (64, 0)}, "'hidden' needs at least one positive layer width"),
        ({"seed": -1}, "'seed' must be >= 0"),
        ({"activation": "sigmoid"}, "'activation' must be one of tanh, relu; got 'sigmoid'"),
        ({"algo": "sac"}, "'algo' must be one of ppo, a2c, trpo; got 'sac'"),
    ],
)
def test_out_of_range_and_bad_choice(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("ppo", "Hopper-v5", overrides)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="unknown preset 'ppo-mm'. Did you mean ppo-m"):
        make_config("ppo-mm", "Hopper-v5")
    with pytest.raises(ConfigError, match="unknown preset 'trpo-plus'.*Presets: ppo, ppo-m"):
        make_config("trpo-plus", "Hopper-v5")


# --set parsing ----------------------------------------------------------------------------
def test_parse_overrides_types():
    out = parse_overrides(["hidden=32,32", "total_steps=1e5", "gamma=0.995", "env_id=Ant-v5",
                           "seed=12"])
    assert out == {"hidden": (32, 32), "total_steps": 100000, "gamma": 0.995,
                   "env_id": "Ant-v5", "seed": 12}
    assert isinstance(out["total_steps"], int) and isinstance(out["seed"], int)
    assert parse_overrides(["hidden=128x64x32"]) == {"hidden": (128, 64, 32)}
    assert parse_overrides([" epochs = 4 "]) == {"epochs": 4}


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("1", True),
                                         ("0", False), ("True", True), ("FALSE", False)])
def test_parse_booleans(text, value):
    assert parse_overrides([f"obs_norm={text}"]) == {"obs_norm": value}
    assert parse_value("kl_stop", text) is value


def test_parse_overrides_needs_equals():
    with pytest.raises(ConfigError, match="--set expects key=value, got 'epochs'"):
        parse_overrides(["epochs"])
    assert parse_overrides([]) == {}


def test_parsed_overrides_feed_make_config():
    cfg = make_config("ppo", "Humanoid-v5",
                      parse_overrides(["total_steps=2e4", "policy_lr=5e-5", "obs_clip=0"]))
    assert (cfg.total_steps, cfg.policy_lr, cfg.value_lr, cfg.obs_clip) == \
        (20000, 5e-5, 1e-4, False)
    assert cfg.num_iterations == 10  # ceil(20000 / 2048)


# serialization -------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_to_dict_from_dict_round_trip(preset):
    cfg = make_config(preset, "Walker2d-v5", {"hidden": (32, 16), "seed": 5, "num_envs": 4})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["hidden"] == [32, 16]
    back = Config.from_dict(data)
    assert back == cfg
    assert back.hidden == (32, 16)
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(make_config(preset, "Walker2d-v5")) != config_hash(cfg)


def test_from_dict_rejects_unknown_and_invalid():
    data = make_config("ppo", "Hopper-v5").to_dict()
    with pytest.raises(ConfigError, match="unknown config key 'polcy_lr'"):
        Config.from_dict({**data, "polcy_lr": 1.0})
    with pytest.raises(ConfigError, match="'gamma' must lie in"):
        Config.from_dict({**data, "gamma": 2.0})



@pytest.mark.parametrize("key, value", [("env_id", "Walker2d-v5"), ("preset", "trpo")])
def test_env_id_or_preset_override_is_rejected(key, value):
    # Silently dropping these would train Hopper with Hopper's lrs under --set env_id=...
    with pytest.raises(ConfigError, match=f"'{key}' is chosen by the preset/env arguments"):
        make_config("ppo", "Hopper-v5", {key: value})


@pytest.mark.parametrize("key, answer", [
    ("n_steps", "steps_per_iter"), ("learning_rate", "policy_lr and value_lr"),
    ("vf_coef", "no value-loss weight"), ("n_epochs", "epochs"),
    ("batch_size", "minibatches"), ("clip_range", "clip_eps"),
    ("num_minibatches", "minibatches"), ("total_timesteps", "total_steps")])
def test_sb3_and_cleanrl_names_are_answered_with_pgscopes(key, answer):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}': in pgscope that is "
                                          f".*{answer}"):
        make_config("ppo", "Pendulum-v1", {key: 1})
    assert not set(OTHER_LIBRARIES) & set(Config.__dataclass_fields__)  # never shadows a key


def test_value_dr3_form_default_choices_and_configs_saved_before_it():
    cfg = make_config("ppo", "Hopper-v5")
    assert cfg.value_dr3_form == "abs"  # |phi(s).phi(s')|, the DR3 authors' code
    assert make_config("ppo", "Hopper-v5", {"value_dr3_form": "signed"}).value_dr3_form == \
        "signed"
    with pytest.raises(ConfigError, match="'value_dr3_form' must be one of abs, signed"):
        make_config("ppo", "Hopper-v5", {"value_dr3_form": "squared"})
    assert config_hash(make_config("ppo", "Hopper-v5", {"value_dr3_form": "signed"})) != \
        config_hash(cfg)  # it changes training, so the run's identity
    # a config saved before the key existed: with the term on, that run used the signed dot
    old = cfg.to_dict()
    del old["value_dr3_form"]
    assert Config.from_dict(dict(old, value_dr3_coef=0.03)).value_dr3_form == "signed"
    assert Config.from_dict(old).value_dr3_form == "abs"  # off: the form changes nothing
    assert Config.from_dict(dict(old, value_dr3_coef=0.03,
                                 value_dr3_form="abs")).value_dr3_form == "abs"


def _fresh_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_checking_a_config_imports_no_probe_module():
    """The config's check of ``probe_kinds`` runs for every config (every ``pgscope
    train``): it checks the names without importing the probe modules (they import SciPy,
    about 0.6 s), refuses a misspelt kind, and accepts a probe a plug-in registered."""
    out = _fresh_python(
        "import sys\n"
        "from pgscope.config import make_config\n"
        "from pgscope.errors import ConfigError\n"
        "make_config('ppo', 'CartPole-v1', {'probe_kinds': 'gradients,features'})\n"
        "make_config('ppo', 'CartPole-v1', {'probe_kinds': 'all'})\n"
        "heavy = [m for m in sys.modules if m.startswith(('scipy', 'pgscope.probes.'))]\n"
        "print('light:', heavy == ['pgscope.probes.schedule'] or heavy)\n"
        "try:\n"
        "    make_config('ppo', 'CartPole-v1', {'probe_kinds': 'gradients,valuez'})\n"
        "except ConfigError as exc:\n"
        "    print('refused:', \"'valuez'\" in str(exc))\n"
        "from pgscope.probes import Probe, register_probe\n"
        "register_probe(Probe('mine', 'a plug-in', lambda i: {}, lambda r, p: None, "
        "lambda r: '', {}, (), None, 99))\n"
        "print('plug-in:', make_config('ppo', 'CartPole-v1', "
        "{'probe_kinds': 'values,mine'}).probe_kinds)\n")
    assert out.split() == ["light:", "True", "refused:", "True", "plug-in:", "values,mine"]
