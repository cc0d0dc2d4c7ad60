"""The "Closer Look at Deep Policy Gradients" probes (SPEC.md section 3).

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


def run_probes(kind: str, run_dir: str | Path, out: str | Path, *,
               checkpoint: int | None = None, seed: int = 0, progress: bool = True,
               sizes: tuple[int, ...] = (100, 1000, 10_000, 100_000), k: int = 10,
               true_pairs: int = 1_000_000, value_pairs: int = 100_000,
               compare: tuple[str | Path, ...] = (), fit_pairs: int = 500_000,
               landscape_counts: tuple[int, ...] = (2_000, 20_000, 100_000),
               landscape_grid: tuple[float, ...] = (0, 0.75, 1.5, 2.25, 3.0)
               ) -> dict[str, Any]:
    """Run probe ``kind`` (one of :data:`KINDS`, or 'all') on a run's
    checkpoint and write its JSON and PNG into ``out``. Returns the results by kind."""
    from pgscope.probes import plots
    from pgscope.probes.baselines import baseline_probe
    from pgscope.probes.gradients import gradient_probe
    from pgscope.probes.landscape import landscape_probe
    from pgscope.probes.trust_region import from_metrics, replay_update
    from pgscope.probes.values import value_probe
    from pgscope.run import load_agent

    try:
        kinds = parse_kinds(kind)
    except ValueError as exc:
        raise ProbeError(str(exc)) from None
    if min(sizes) < 2 or k < 2:
        raise ProbeError("sample sizes and k must be at least 2.")
    if "gradients" in kinds and true_pairs < 10 * max(sizes):
        raise ProbeError(f"--true-pairs {true_pairs} is too small for the grid: the 'true' "
                         f"gradient needs at least 10x the largest size ({max(sizes)}).")
    agent = load_agent(run_dir, checkpoint)
    results: dict[str, Any] = {}
    pngs: dict[str, Any] = {}
    if "gradients" in kinds:
        results["gradients"] = gradient_probe(agent, sizes, k, true_pairs, seed, progress)
        pngs["gradients"] = lambda p: plots.plot_gradients(results["gradients"], p)
    if "values" in kinds:
        results["values"] = value_probe(agent, value_pairs, seed, progress=progress)
        pngs["values"] = lambda p: plots.plot_values(results["values"], p)
    if "baselines" in kinds:
        results["baselines"] = baseline_probe(agent, sizes, k, fit_pairs, seed, progress)
        pngs["baselines"] = lambda p: plots.plot_baselines(results["baselines"], p)
    if "landscape" in kinds:
        results["landscape"] = landscape_probe(run_dir, checkpoint, landscape_grid,
                                               landscape_grid, landscape_counts, seed, progress)
        pngs["landscape"] = lambda p: plots.plot_landscape(results["landscape"], p)
    if "trust-region" in kinds:
        runs = [from_metrics(run_dir)] + [from_metrics(c) for c in compare]
        replay = replay_update(run_dir, checkpoint, seed)
        results["trust-region"] = {"runs": runs, "replay": replay}
        pngs["trust-region"] = lambda p: plots.plot_trust_region(runs, replay, p)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # created only once every result is computed
    for name, result in results.items():
        result["checkpoint"] = {"run": str(run_dir), "iteration": checkpoint}
        _atomic_text(out / f"{name}.json", json.dumps(result, indent=2, default=float))
        tmp = out / f".{name}.tmp.png"
        pngs[name](tmp)
        os.replace(tmp, out / f"{name}.png")
    return results


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


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
    run_probes(cfg.probe_kinds, run_dir, tmp, seed=cfg.seed + iteration, progress=progress,
               sizes=cfg.probe_sizes, k=cfg.probe_k, true_pairs=cfg.probe_true_pairs,
               value_pairs=cfg.probe_value_pairs, fit_pairs=cfg.probe_true_pairs,
               landscape_counts=(2_000,), landscape_grid=(0, 1, 2))
    os.replace(tmp, final)
    return final
