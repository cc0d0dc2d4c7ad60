"""False positives of ``pgscope doctor``: the ppo preset on Pendulum-v1 and Hopper-v5, five
seeds each, must fire no alarm. Also (``--detection``) the detection table: each alarm
against the crafted run of tests/test_doctor.py that must fire it.

    .venv/bin/python bench/doctor_health.py                  # ~40 min on 2 busy cores
    .venv/bin/python bench/doctor_health.py --detection      # ~2 min

Resumable: every run lives in ``--out`` (default runs/doctor-health/<env>/seed_<s>); a
finished run is not trained again (only diagnosed again, which takes a second), a killed
one resumes from its checkpoint. Each run's result is appended to ``--out/results.jsonl``
as soon as it is known, and the table is printed (Markdown, for docs/doctor.md) at the
end. One process, one run at a time. Exit status 1 when any alarm fired.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"Pendulum-v1": 150_000, "Hopper-v5": 150_000}


def health(out: Path, seeds: list[int], envs: dict[str, int]) -> list[dict]:
    from pgscope import Config, make_config, train
    from pgscope.doctor import ALARMS, diagnose
    from pgscope.run import RunDir

    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results_file.write_text("")  # rewritten by every invocation; finished runs are kept
    rows = []
    for env, steps in envs.items():
        for seed in seeds:
            run = out / env / f"seed_{seed}"
            t0 = time.time()
            state = RunDir(run).read_status().get("state") if run.exists() else None
            if state != "complete":
                if (run / "config.json").exists():
                    train(Config(), run, resume=True, progress=False)  # its own config
                else:
                    cfg = make_config("ppo", env, {"total_steps": steps, "seed": seed})
                    train(cfg, run, progress=False)
            findings = diagnose(run)
            records = RunDir(run).read_metrics()
            extremes = _extremes(records)
            returns = [r["return_mean"] for r in records if r["return_mean"] is not None]
            row = dict(env=env, seed=seed, steps=steps, iterations=len(records),
                       checks=len(ALARMS), alarms=sorted({f.alarm for f in findings}),
                       evidence=[f"{f.alarm}: {f.evidence}" for f in findings],
                       first_return=returns[0] if returns else None,
                       final_return=sum(returns[-10:]) / len(returns[-10:]) if returns
                       else None, train_minutes=round((time.time() - t0) / 60, 1),
                       extremes=extremes)
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{env} seed {seed}: {row['alarms'] or 'no alarm'} "
                  f"(return {row['first_return']:.0f} -> {row['final_return']:.0f})",
                  flush=True)
            rows.append(row)
    return rows


#: Healthy-run extremes reported next to the thresholds they must stay under (or above).
EXTREMES = (("kl_mean", "max", "kl-above-target / kl-extreme: 2 x / 10 x the target (0.02 here)"),
            ("kl_max", "max", "kl-extreme: 10 nats"),
            ("clip_fraction_after", "max", "clip-fraction-high: 0.5 (5 in a row)"),
            ("action_saturation", "max", "actions-saturated: 0.8 (5 in a row)"),
            ("value_target_absmax", "max", "values-out-of-scale: 100 (5 in a row)"),
            ("advantage_absmax", "max", "values-out-of-scale: 100 (5 in a row)"),
            ("approx_kl", "min", "negative-kl: -1e-6"),
            ("ratio_first_minibatch_dev", "max", "ratio-not-one: 1e-5"))


def _extremes(records: list[dict]) -> dict:
    out = {}
    for key, how, _ in EXTREMES:
        v = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        out[key] = (max(v) if how == "max" else min(v)) if v else None
    std = [r["policy_std"] for r in records if isinstance(r.get("policy_std"), (int, float))]
    out["policy_std_min_over_first"] = min(std) / std[0] if std else None
    return out


def extremes_table(rows: list[dict]) -> str:
    lines = ["| metric | " + " | ".join(dict.fromkeys(r["env"] for r in rows)) +
             " | alarm: threshold |", "|---" * (2 + len({r["env"] for r in rows})) + "|"]
    envs = list(dict.fromkeys(r["env"] for r in rows))
    for key, how, alarm in (*EXTREMES, ("policy_std_min_over_first", "min",
                                        "std-collapse: 0.1")):
        cells = []
        for env in envs:
            vals = [r["extremes"][key] for r in rows if r["env"] == env
                    and r.get("extremes", {}).get(key) is not None]
            cells.append(f"{(max(vals) if how == 'max' else min(vals)):.3g}" if vals else "-")
        lines.append(f"| {how} {key} | " + " | ".join(cells) + f" | {alarm} |")
    return "\n".join(lines)


def health_table(rows: list[dict]) -> str:
    lines = ["| env | seeds | env steps per seed | iterations | return, first -> last 10 "
             "iterations (mean over seeds) | alarms fired |", "|---|---|---|---|---|---|"]
    for env in dict.fromkeys(r["env"] for r in rows):
        g = [r for r in rows if r["env"] == env]
        fired = sorted({a for r in g for a in r["alarms"]})
        first = sum(r["first_return"] for r in g) / len(g)
        final = sum(r["final_return"] for r in g) / len(g)
        lines.append(f"| {env} | {', '.join(str(r['seed']) for r in g)} | {g[0]['steps']:,} | "
                     f"{g[0]['iterations']} | {first:.0f} -> {final:.0f} | "
                     f"{', '.join(fired) if fired else 'none'} |")
    return "\n".join(lines)


def detection(out: Path) -> str:
    """Train each crafted run of tests/test_doctor.py and tabulate alarm -> fired?"""
    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    import test_doctor as t  # noqa: PLC0415 - the crafted runs are defined with the tests

    from pgscope import make_config, train
    from pgscope.doctor import diagnose
    from pgscope.errors import DivergenceError

    out.mkdir(parents=True, exist_ok=True)
    fired: dict[str, set[str]] = {}
    for name, (preset, env, overrides, fault, _) in t.CRAFTED.items():
        run = out / name
        if not (run / "status.json").exists():
            cfg = make_config(preset, env, {**t.TINY, "seed": 0, **overrides})
            with pytest.MonkeyPatch.context() as mp:
                if fault is not None:
                    fault(mp)
                try:
                    train(cfg, run, progress=False)
                except DivergenceError:
                    pass
        fired[name] = {f.alarm for f in diagnose(run)}
    lines = ["| alarm | crafted run | fired? | healthy control | fired there? |",
             "|---|---|---|---|---|"]
    for alarm, (crafted, control) in t.DETECTION.items():
        desc = f"{t.CRAFTED[crafted][1]} {t.CRAFTED[crafted][4]}"
        lines.append(f"| `{alarm}` | {desc} | {'yes' if alarm in fired[crafted] else 'NO'} | "
                     f"{control} | {'YES' if alarm in fired[control] else 'no'} |")
    lines.append("| `probe-value-error`, `probe-baseline-worse` | synthetic probe results "
                 "written into a real run (tests/test_doctor.py::test_probe_alarms_read_probe_"
                 "results) | yes | the same run with healthy probe numbers | no |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "doctor-health")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, help="env steps per seed for every env")
    p.add_argument("--detection", action="store_true", help="the detection table instead")
    args = p.parse_args()
    stamp = (f"{datetime.date.today().isoformat()}, {platform.node()}, "
             f"{platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}")
    if args.detection:
        print(detection(args.out / "detection"))
        print(f"\n({stamp})")
        return
    envs = {e: args.steps or s for e, s in ENVS.items()}
    rows = health(args.out, list(range(args.seeds)), envs)
    print()
    print(health_table(rows))
    print()
    print(extremes_table(rows))
    print(f"\n({stamp}; {sum(r['train_minutes'] for r in rows):.0f} training minutes "
          "this invocation)")
    fired = [r for r in rows if r["alarms"]]
    for r in fired:
        print(f"{r['env']} seed {r['seed']}: " + "; ".join(r["evidence"]))
    sys.exit(1 if fired else 0)


if __name__ == "__main__":
    main()
