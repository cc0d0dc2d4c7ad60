"""``pgscope dr3 dataset | train | summary``: the offline DR3 experiment's command line
(registered by :mod:`pgscope.cli` through :func:`add_dr3_parser`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _dataset(args: argparse.Namespace) -> int:
    from pgscope.dr3.dataset import collect_dataset, load_dataset

    out = collect_dataset(args.run, args.out, transitions=args.transitions,
                          checkpoint=args.checkpoint, seed=args.seed, gamma=args.gamma,
                          heldout_episodes=args.heldout_episodes,
                          reference_stride=args.reference_stride,
                          reference_rollouts=args.reference_rollouts, horizon=args.horizon,
                          progress=not args.quiet)
    meta = load_dataset(out).meta
    print(f"dataset: {meta['transitions']} transitions in {meta['episodes']} episodes of "
          f"{meta['env_id']}; Q reference on {meta['reference']['pairs']} held-out pairs "
          f"-> {out}")
    print(f"next: pgscope dr3 train {out} --out DIR")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from pgscope.dr3.dataset import OfflineError
    from pgscope.dr3.trainer import TrainSettings, train_offline

    settings = TrainSettings(
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        seeds=tuple(range(args.seed0, args.seed0 + args.seeds)) if args.seeds > 0 else (),
        steps=args.steps, hidden=tuple(args.hidden), lr=args.lr, batch=args.batch,
        target=args.target, encoding=args.encoding, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every)
    settings.check()  # every setting before the dataset is read
    if args.threads < 1:
        raise OfflineError(f"--threads must be at least 1, got {args.threads}.")
    torch.set_num_threads(args.threads)
    result = train_offline(args.dataset, settings, args.out, progress=not args.quiet)
    print(f"{len(result.members)} members, {result.steps_per_s:.1f} steps/s "
          f"({result.steps_per_s * len(result.members):.0f} member-steps/s) -> {args.out}")
    print(f"next: pgscope dr3 summary {args.out}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from pgscope.dr3.summary import format_table, summarize

    result = summarize(args.dir, args.out, plots=not args.no_plots)
    print(format_table(result))
    print(f"\nwritten: {', '.join(Path(p).name for p in result['files'])} in "
          f"{Path(result['files'][0]).parent}")
    return 0


def add_dr3_parser(sub: Any) -> None:
    """Add ``dr3`` and its three subcommands to the CLI's subparsers ``sub``."""
    from pgscope.cli import count

    p = sub.add_parser("dr3", help="the offline DR3 experiment: SARSA vs TD vs DR3 "
                       "(docs/dr3.md)")
    dsub = p.add_subparsers(dest="dr3_command", required=True, metavar="COMMAND",
                            title="commands")

    d = dsub.add_parser("dataset", help="transitions of a run's stochastic policy and a "
                        "Monte Carlo Q reference on held-out episodes")
    d.add_argument("run", metavar="RUN", type=Path,
                   help="a run directory or checkpoint file (the behaviour policy)")
    d.add_argument("--out", type=Path, required=True, metavar="DATASET",
                   help="the new dataset directory")
    d.add_argument("--transitions", type=count, default=200_000,
                   help="transitions of the behaviour policy to collect")
    d.add_argument("--checkpoint", type=int, metavar="ITER",
                   help="a kept checkpoint's iteration (default: the latest)")
    d.add_argument("--seed", type=int, default=0, help="seed of the collection")
    d.add_argument("--gamma", type=float, default=0.99,
                   help="discount of the Monte Carlo Q reference")
    d.add_argument("--heldout-episodes", type=count, default=20,
                   help="episodes held out for the Q reference")
    d.add_argument("--reference-stride", type=count, default=100,
                   help="a reference pair every this many steps of a held-out episode")
    d.add_argument("--reference-rollouts", type=count, default=5,
                   help="Monte Carlo rollouts per reference pair")
    d.add_argument("--horizon", type=count,
                   help="steps per reference rollout (default: the env's time limit)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_dataset)

    t = dsub.add_parser("train", help="train every variant x seed as one batched model "
                        "(resumes EXPERIMENT when it holds a checkpoint)")
    t.add_argument("dataset", metavar="DATASET", type=Path,
                   help="a dataset directory ('pgscope dr3 dataset')")
    t.add_argument("--out", type=Path, required=True, metavar="EXPERIMENT",
                   help="the experiment directory")
    t.add_argument("--variants", default="sarsa,td,dr3:0.03",
                   help="comma-separated: sarsa, td, td:K (TD from the behaviour policy "
                        "with its spread times K; td:0 its mean action), dr3:C (default: "
                        "sarsa,td,dr3:0.03)")
    t.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    t.add_argument("--seed0", type=int, default=0, help="first seed (default: 0)")
    t.add_argument("--steps", type=count, default=100_000, help="gradient steps")
    t.add_argument("--hidden", type=int, nargs="*", default=[256, 256], metavar="N",
                   help="hidden layer widths of the Q-network (none: linear in the input)")
    t.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    t.add_argument("--batch", type=count, default=256, help="transitions per minibatch")
    t.add_argument("--target", default="polyak:0.005",
                   help="polyak:TAU (every step) or copy:K (every K steps)")
    t.add_argument("--encoding", choices=["concat", "outer"], default="concat",
                   help="the Q-network's input: observation and action concatenated, or "
                        "their outer product")
    t.add_argument("--log-every", type=count, default=1000,
                   help="gradient steps between log lines")
    t.add_argument("--checkpoint-every", type=count, default=10_000,
                   help="gradient steps between checkpoints (a multiple of --log-every)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    s = dsub.add_parser("summary", help="table with CIs over seeds and plots of an "
                        "experiment")
    s.add_argument("dir", metavar="EXPERIMENT", type=Path,
                   help="an experiment directory ('pgscope dr3 train')")
    s.add_argument("--out", type=Path, metavar="DIR",
                   help="where to write (default: EXPERIMENT/summary)")
    s.add_argument("--no-plots", action="store_true", help="the table only, no plots")
    s.set_defaults(func=_summary)
