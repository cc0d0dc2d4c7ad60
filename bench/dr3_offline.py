"""The offline DR3 experiment end to end (docs/dr3.md, "Offline experiment"): a dataset from
a trained run, every variant x seed trained as one batched model, the summary.

    .venv/bin/python bench/dr3_offline.py RUN --out runs/dr3            # defaults below
    .venv/bin/python bench/dr3_offline.py RUN --out runs/dr3 --transitions 50000 \\
        --steps 30000 --seeds 2 --variants sarsa,td,dr3:0.03           # the issue's trial
    .venv/bin/python bench/dr3_offline.py --speed runs/dr3/data        # steps/s, 1 vs 12

Resumable: the dataset (``OUT/data``) is made once; training (``OUT/train``) resumes from
its checkpoint when killed (re-run the same command; a larger ``--steps`` extends it); the
summary (``OUT/train/summary``: table CSV/JSON, ``dr3-offline.png``) is rewritten at
every ``--summary-every`` steps, so results appear while it runs. One process.
``--speed`` measures training steps/s for 1, 4 and 12 members (one torch thread) on a
dataset and appends the numbers to ``OUT/speed.jsonl`` (OUT = the dataset's parent).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path


def speed(dataset: Path, hidden: tuple[int, ...], steps: int) -> list[dict]:
    """Steps/s of the batched trainer for 1, 4 and 12 members (TD + DR3 mix)."""
    import torch

    from pgscope.dr3 import TrainSettings, load_dataset, train_offline

    torch.set_num_threads(1)
    data = load_dataset(dataset)
    rows = []
    for members, variants, seeds in ((1, ("dr3:0.03",), (0,)),
                                     (4, ("sarsa", "td", "dr3:0.03", "dr3:0.3"), (0,)),
                                     (12, ("sarsa", "td", "dr3:0.03", "dr3:0.3"), (0, 1, 2))):
        settings = TrainSettings(variants=variants, seeds=seeds, steps=steps, hidden=hidden,
                                 log_every=steps, checkpoint_every=steps)
        train_offline(data, settings, progress=False)  # warm-up (allocations, imports)
        t0 = time.perf_counter()
        train_offline(data, settings, progress=False)
        dt = time.perf_counter() - t0
        row = {"members": members, "hidden": list(hidden), "steps": steps,
               "steps_per_s": steps / dt, "member_steps_per_s": members * steps / dt,
               "load_average": os.getloadavg()[0], "machine": platform.processor(),
               "date": datetime.date.today().isoformat()}
        print(json.dumps(row))
        rows.append(row)
    with open(dataset.parent / "speed.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, nargs="?", help="trained run (behaviour policy)")
    p.add_argument("--out", type=Path, default=Path("runs/dr3"))
    p.add_argument("--transitions", type=int, default=200_000)
    p.add_argument("--variants", default="sarsa,td,dr3:0.003,dr3:0.03,dr3:0.3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--hidden", type=int, nargs="*", default=[256, 256])
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--summary-every", type=int, default=5000)
    p.add_argument("--speed", type=Path, metavar="DATASET",
                   help="only measure steps/s for 1, 4 and 12 members on DATASET")
    p.add_argument("--speed-steps", type=int, default=30)
    args = p.parse_args(argv)

    import torch

    from pgscope.dr3 import TrainSettings, collect_dataset, train_offline
    from pgscope.dr3.summary import format_table, summarize

    if args.speed is not None:
        speed(args.speed, tuple(args.hidden), args.speed_steps)
        return 0
    if args.run is None:
        p.error("give the trained run whose policy collects the dataset (or --speed)")
    torch.set_num_threads(1)
    data = args.out / "data"
    settings = TrainSettings(
        variants=tuple(args.variants.split(",")), seeds=tuple(range(args.seeds)),
        steps=args.steps, hidden=tuple(args.hidden), log_every=args.log_every,
        checkpoint_every=args.summary_every)
    settings.check()  # before the dataset is collected
    if not (data / "dataset.json").exists():
        t0 = time.perf_counter()
        collect_dataset(args.run, data, transitions=args.transitions)
        print(f"dataset: {time.perf_counter() - t0:.0f} s -> {data}", file=sys.stderr)
    train_dir = args.out / "train"

    def on_log(step: int, lines: dict) -> None:
        if step % args.summary_every == 0:
            summarize(train_dir)

    t0 = time.perf_counter()
    result = train_offline(data, settings, train_dir, on_log=on_log)
    summary = summarize(train_dir)
    print(format_table(summary))
    print(f"training: {time.perf_counter() - t0:.0f} s this session, "
          f"{result.steps_per_s:.2f} steps/s for {len(result.members)} members")
    return 0


if __name__ == "__main__":
    sys.exit(main())
