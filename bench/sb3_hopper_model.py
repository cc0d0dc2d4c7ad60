"""Train a small Stable-Baselines3 PPO on Hopper-v5 and save it for the adapter example of
docs/adapters.md: the model zip and its VecNormalize statistics.

    .venv/bin/python bench/sb3_hopper_model.py --steps 30000 --out runs/sb3-hopper
    .venv/bin/pgscope probe gradients --sb3 runs/sb3-hopper/model.zip --env Hopper-v5 \\
        --vecnormalize runs/sb3-hopper/vecnormalize.pkl --trust-pickle \\
        --sizes 100 1000 --k 5 --true-pairs 20000 --out runs/sb3-hopper/probes

Needs stable-baselines3 (``pip install -e '.[sb3]'``). SB3's default PPO hyperparameters
(n_steps 2048, batch 64, 10 epochs, gamma 0.99, GAE lambda 0.95, clip 0.2) with
observation and reward normalization (VecNormalize), as the usual MuJoCo settings use.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/sb3-hopper"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    venv = VecNormalize(make_vec_env("Hopper-v5", n_envs=1, seed=args.seed))
    model = PPO("MlpPolicy", venv, seed=args.seed, device="cpu", verbose=0)
    model.learn(args.steps)
    model.save(args.out / "model.zip")
    venv.save(str(args.out / "vecnormalize.pkl"))
    episodes = [e["r"] for e in model.ep_info_buffer]
    summary = {"steps": args.steps, "seed": args.seed, "seconds": round(time.time() - start, 1),
               "last_episodes_mean_return": sum(episodes) / max(len(episodes), 1),
               "model": str(args.out / "model.zip"),
               "vecnormalize": str(args.out / "vecnormalize.pkl")}
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
