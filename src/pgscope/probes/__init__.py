"""The "Closer Look at Deep Policy Gradients" probes (docs/design.md section 3).

Every probe takes a saved agent, draws fresh samples from its current policy with its
statistics frozen, and never changes it. ``run_probes`` computes what was asked and only
then writes ``DIR/<kind>.json`` and ``DIR/<kind>.png``, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pgscope.errors import ProbeError

KINDS = ("gradients", "values", "baselines", "landscape", "trust-region")


def parse_kinds(kind: str) -> tuple[str, ...]:
    """'all', one kind, or a comma-separated list of kinds."""
    kinds = KINDS if kind == "all" else tuple(k.strip() for k in kind.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown probe '{', '.join(bad) or kind}'; choose from "
                         f"{', '.join(KINDS)}, all (or a comma-separated list).")
    return kinds


def _check_settings(kinds: tuple[str, ...], run_dir: Path, out: Path,
                    checkpoint: int | None, sizes: tuple[int, ...], k: int, true_pairs: int,
                    value_pairs: int, fit_pairs: int, compare: tuple[str | Path, ...],
                    landscape_counts: tuple[int, ...], landscape_grid: tuple[float, ...]
                    ) -> None:
    """Every check that can fail, before any rollout or directory is made."""
    import math

    from pgscope.config import Config
    from pgscope.run import RunDir, load_checkpoint, resolve_checkpoint

    if not sizes or min(sizes) < 2 or k < 2:
        raise ProbeError("sample sizes and k must be at least 2.")
    for name, value in (("--true-pairs", true_pairs), ("--pairs", value_pairs),
                        ("--fit-pairs", fit_pairs)):
        if value < 1:
            raise ProbeError(f"{name} must be a positive number of pairs, got {value}.")
    if "gradients" in kinds and true_pairs < 10 * max(sizes):
        raise ProbeError(f"--true-pairs {true_pairs} is too small for the grid: the 'true' "
                         f"gradient needs at least 10x the largest size ({max(sizes)}).")
    if "landscape" in kinds:
        if not landscape_counts or min(landscape_counts) < 1:
            raise ProbeError("--landscape-counts must be positive numbers of env steps.")
        if len(landscape_grid) < 2 or not all(math.isfinite(x) for x in landscape_grid):
            raise ProbeError("--landscape-grid needs at least two finite multiples.")
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out '{out}' is a file; probe results need a directory.")
    parent = next((q for q in (out, *out.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ProbeError(f"cannot write probe results under '{parent}'; choose another --out.")
    ckpt_path = resolve_checkpoint(run_dir, checkpoint)  # a run directory or a file
    for other in compare:
        RunDir.open(Path(other))
        if not RunDir(Path(other)).read_metrics():
            raise ProbeError(f"--compare '{other}' has no metrics lines yet.")
    if "values" in kinds or "baselines" in kinds:
        from pgscope.probes.values import check_time_limit, effective_horizon

        cfg = Config.from_dict(load_checkpoint(ckpt_path)["config"])
        check_time_limit(cfg.env_id, effective_horizon(cfg.gamma, 0.01))


def headline(kind: str, result: dict[str, Any]) -> str:
    """One line with the probe's main numbers (printed as each probe finishes)."""
    def iv(d: dict[str, float]) -> str:
        return f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"

    try:
        if kind == "gradients":
            row = result["policy"][-1]
            return (f"gradients: at {row['n']} pairs, pairwise cosine {iv(row['pairwise_cosine'])}"
                    f", cosine to the 'true' gradient {iv(row['cosine_to_true'])}")
        if kind == "values":
            return (f"values: relative error vs GAE targets "
                    f"{iv(result['vs_gae_targets']['relative_error'])}, vs true returns "
                    f"{iv(result['vs_true_returns']['relative_error'])}")
        if kind == "baselines":
            row = result["rows"][-1]
            parts = [f"{name} {iv(row[name]['pairwise_cosine'])}"
                     for name in ("agent", "true", "zero") if "pairwise_cosine" in row[name]]
            return f"baselines: at {row['n']} pairs, pairwise cosine: " + ", ".join(parts)
        if kind == "landscape":
            return (f"landscape: step norm {result['delta_norm']:.3g}, surrogate at the step "
                    f"{result['surrogate'][1][0]:.3g} vs {result['surrogate'][0][0]:.3g} at "
                    f"theta_old")
        if kind == "trust-region":
            phase = result["replay"]["phase"]
            return (f"trust-region: replayed update: mean KL {phase['kl_mean']:.3g}, max ratio "
                    f"{phase.get('ratio_max_after', phase.get('ratio_max', float('nan'))):.3g}")
    except (KeyError, IndexError, TypeError):
        pass
    return f"{kind}: done"


def run_probes(kind: str, run_dir: str | Path, out: str | Path, *,
               checkpoint: int | None = None, seed: int = 0, progress: bool = True,
               sizes: tuple[int, ...] = (100, 1000, 10_000, 100_000), k: int = 10,
               true_pairs: int = 1_000_000, value_pairs: int = 100_000,
               compare: tuple[str | Path, ...] = (), fit_pairs: int = 500_000,
               landscape_counts: tuple[int, ...] = (2_000, 20_000, 100_000),
               landscape_grid: tuple[float, ...] = (0, 0.75, 1.5, 2.25, 3.0),
               log: Any = None) -> dict[str, Any]:
    """Run probe ``kind`` (one of :data:`KINDS`, 'all', or a comma-separated list) on a
    run's checkpoint and write each probe's JSON and PNG into ``out`` as soon as that probe
    finishes (each file atomically). Every setting is checked before anything is computed.
    Each JSON records what was measured: the run, the checkpoint's iteration and env
    steps, the pgscope version and every setting. ``log(line)`` (default: print to
    stderr) receives one headline per finished probe. Returns the results by kind."""
    import sys

    from pgscope import __version__
    from pgscope.probes import plots
    from pgscope.probes.baselines import baseline_probe
    from pgscope.probes.gradients import gradient_probe
    from pgscope.probes.landscape import landscape_probe
    from pgscope.probes.trust_region import from_metrics, replay_update
    from pgscope.probes.values import value_probe
    from pgscope.run import load_agent, load_checkpoint, resolve_checkpoint

    try:
        kinds = parse_kinds(kind)
    except ValueError as exc:
        raise ProbeError(str(exc)) from None
    run_dir, out = Path(run_dir), Path(out)
    _check_settings(kinds, run_dir, out, checkpoint, tuple(sizes), k, true_pairs, value_pairs,
                    fit_pairs, tuple(compare), tuple(landscape_counts), tuple(landscape_grid))
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr)

    ckpt_path = resolve_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    measured = {"run": str(run_dir), "checkpoint_file": str(ckpt_path),
                "iteration": int(ckpt["iteration"]), "env_steps": int(ckpt["env_steps"])}
    settings = {"kinds": list(kinds), "checkpoint": checkpoint, "seed": seed,
                "sizes": list(sizes), "k": k, "true_pairs": true_pairs,
                "value_pairs": value_pairs, "fit_pairs": fit_pairs,
                "compare": [str(c) for c in compare],
                "landscape_counts": list(landscape_counts),
                "landscape_grid": list(landscape_grid)}
    del ckpt
    agent = load_agent(run_dir, checkpoint)
    compute = {
        "gradients": (lambda: gradient_probe(agent, sizes, k, true_pairs, seed, progress),
                      plots.plot_gradients),
        "values": (lambda: value_probe(agent, value_pairs, seed, progress=progress),
                   plots.plot_values),
        "baselines": (lambda: baseline_probe(agent, sizes, k, fit_pairs, seed, progress),
                      plots.plot_baselines),
        "landscape": (lambda: landscape_probe(run_dir, checkpoint, landscape_grid,
                                              landscape_grid, landscape_counts, seed,
                                              progress), plots.plot_landscape),
        "trust-region": (lambda: {"runs": [from_metrics(run_dir)]
                                  + [from_metrics(c) for c in compare],
                                  "replay": replay_update(run_dir, checkpoint, seed)},
                         lambda r, path: plots.plot_trust_region(r["runs"], r["replay"], path)),
    }
    results: dict[str, Any] = {}
    for name in kinds:
        fn, plot = compute[name]
        result = fn()
        result["checkpoint"] = measured
        result["pgscope_version"] = __version__
        result["probe_settings"] = settings
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(out / f"{name}.json", json.dumps(result, indent=2, default=float))
        tmp = out / f".{name}.tmp.png"
        plot(result, tmp)
        os.replace(tmp, out / f"{name}.png")
        results[name] = result
        log(headline(name, result))
    return results


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def scheduled_probe_failures(run_dir: Path) -> set[int]:
    """Iterations whose scheduled probes failed during training (``probes/failures.jsonl``);
    training does not retry them, 'pgscope probe' can."""
    path = Path(run_dir) / "probes" / "failures.jsonl"
    if not path.exists():
        return set()
    failed = set()
    for line in path.read_text().splitlines():
        try:
            failed.add(int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return failed


def scheduled_probes(run_dir: Path, iteration: int, progress: bool = False) -> Path:
    """The probes a config schedules with ``probe_every``, on the run's latest checkpoint,
    written to ``run_dir/probes/iter_XXXXXX/`` (built in a temporary folder, then renamed,
    so a folder that exists is complete)."""
    import shutil

    from pgscope.run import RunDir

    cfg = RunDir.open(run_dir).read_config()
    final = run_dir / "probes" / f"iter_{iteration:06d}"
    if final.exists():
        return final
    tmp = run_dir / "probes" / f".iter_{iteration:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run_probes(cfg.probe_kinds, run_dir, tmp, checkpoint=iteration, seed=cfg.seed + iteration,
               progress=progress, log=lambda line: None,
               sizes=cfg.probe_sizes, k=cfg.probe_k, true_pairs=cfg.probe_true_pairs,
               value_pairs=cfg.probe_value_pairs, fit_pairs=cfg.probe_true_pairs,
               landscape_counts=(2_000,), landscape_grid=(0, 1, 2))
    os.replace(tmp, final)
    return final
