"""The Closer-Look probes on Hopper-v5 PPO checkpoints, with run time and peak memory.

    .venv/bin/python bench/probes_hopper.py --run runs/bench1m/ppo-s0 --checkpoint 150 \
        --kinds gradients values baselines landscape trust-region --out docs/probes/hopper-ppo-150

Each probe runs in its own subprocess so that its peak resident memory (ru_maxrss) and wall
time are its own; results land in OUT/<kind>.json and OUT/<kind>.png, and OUT/timing.json
records the cost of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(kind: str, run: str, checkpoint: int, out: str, extra: list[str]) -> None:
    from pgscope.cli import main

    start = time.perf_counter()
    code = main(["probe", kind, run, "--checkpoint", str(checkpoint), "--out", out, "--quiet",
                 *extra])
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mb": peak_mb, "rc": code}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--checkpoint", type=int, required=True)
    p.add_argument("--kinds", nargs="+", default=["gradients", "values", "baselines",
                                                   "landscape", "trust-region"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further 'pgscope probe' options, passed to every probe")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args.one, args.run, args.checkpoint, str(args.out), args.extra)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    timing_path = args.out / "timing.json"
    old = json.loads(timing_path.read_text())["probes"] if timing_path.exists() else []
    timing = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
              "run": args.run, "checkpoint": args.checkpoint,
              "probes": [e for e in old if e["kind"] not in args.kinds]}  # keep others' costs
    for kind in args.kinds:
        cmd = [sys.executable, __file__, "--run", args.run, "--checkpoint",
               str(args.checkpoint), "--out", str(args.out), "--one", kind, "--extra",
               *args.extra]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        entry = json.loads(line[-1]) if line else {"kind": kind, "rc": res.returncode,
                                                   "stderr": res.stderr[-2000:]}
        timing["probes"].append(entry)
        print(json.dumps(entry), flush=True)
        timing_path.write_text(json.dumps(timing, indent=2) + "\n")


if __name__ == "__main__":
    main()
