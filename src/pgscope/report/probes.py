"""Probe results in a report: for each ``<kind>.json`` its plot (the probe's own PNG), its
numbers and a one-line reading of what they mean."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pgscope.report.page import ci_text, esc, fmt, image, table


def probe_files(folder: Path) -> list[tuple[str, dict[str, Any], Path | None]]:
    """(kind, result, png or None) of every probe result in ``folder``, in the probe
    registry's order (:func:`pgscope.probes.probe_names`)."""
    from pgscope.probes import probe_names

    out = []
    for kind in probe_names():
        f = folder / f"{kind}.json"
        if f.exists():
            try:
                result = json.loads(f.read_text())
            except ValueError:
                continue
            png = folder / f"{kind}.png"
            out.append((kind, result, png if png.exists() else None))
    return out


def probe_folders(run: Path) -> list[Path]:
    """A run's probe output folders (``probes/iter_*``, finished ones only), by iteration."""
    root = run / "probes"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and probe_files(p))


def _iv(d: dict[str, Any] | None) -> str:
    d = d or {}
    return ci_text(d.get("mean"), d.get("ci_low"), d.get("ci_high"), 3)


def _nearest(rows: list[dict[str, Any]], n: float) -> dict[str, Any]:
    return min(rows, key=lambda r: abs(math.log(max(r["n"], 1)) - math.log(max(n, 1))))


def reading(kind: str, r: dict[str, Any]) -> str:
    """One sentence: what the probe's numbers say."""
    try:
        if kind == "gradients":
            horizon = (r.get("settings") or {}).get("horizon", 2048)
            row = _nearest(r["policy"], horizon)
            pc, ct = row["pairwise_cosine"], row["cosine_to_true"]
            verdict = ("agree well" if pc["mean"] > 0.5 else "agree only loosely"
                       if pc["mean"] > 0.1 else "barely agree")
            return (f"At {row['n']:,} state-action pairs (about one training batch) independent "
                    f"policy-gradient estimates {verdict} (mean pairwise cosine "
                    f"{fmt(pc['mean'], 2)}) and point {fmt(ct['mean'], 2)} of the way (cosine) "
                    "towards the 'true' gradient.")
        if kind == "values":
            g = r["vs_gae_targets"]["relative_error"]["mean"]
            t = r["vs_true_returns"]["relative_error"]["mean"]
            return (f"The value net errs by {100 * g:.1f}% (relative) against the GAE targets "
                    f"it is trained on and by {100 * t:.1f}% against true returns"
                    + (": it fits its targets better than it predicts returns." if t > g else
                       "."))
        if kind == "baselines":
            row = r["rows"][-1]
            a, tr, z = (row[k]["covariance_trace"]["mean"] for k in ("agent", "true", "zero"))
            if a >= z:
                return (f"At {row['n']:,} pairs the agent's value baseline does not reduce "
                        f"gradient variance: {fmt(a, 3)} with it, {fmt(z, 3)} with no baseline "
                        f"({fmt(tr, 3)} with the 'true' value function).")
            share = (z - a) / (z - tr) if z > tr else float("nan")
            return (f"At {row['n']:,} pairs the agent's value baseline cuts gradient variance "
                    f"from {fmt(z, 3)} (no baseline) to {fmt(a, 3)}; the 'true' value function "
                    f"reaches {fmt(tr, 3)}"
                    + (f": the agent achieves {fmt(100 * share, 3)}% of that reduction."
                       if math.isfinite(share) else "."))
        if kind == "landscape":
            counts = r["settings"]["counts"]
            top = r["true_return"][str(counts[-1])]
            s0, s1 = r["surrogate"][0][0], r["surrogate"][1][0]
            t0, t1 = top[0][0], top[1][0]
            agree = (s1 - s0) * (t1 - t0) > 0
            return (f"Along the update step the surrogate changes by {fmt(s1 - s0, 3)} and the "
                    f"true return (from {int(counts[-1]):,} steps) by {fmt(t1 - t0, 3)}: the "
                    f"surrogate {'predicts' if agree else 'does not predict'} the direction of "
                    "the true change.")
        if kind == "features":
            return (f"The value net's features of consecutive states have mean dot product "
                    f"{fmt(r['feature_dot']['mean'], 3)} (cosine "
                    f"{fmt(r['feature_cosine']['mean'], 2)}) and effective rank "
                    f"{fmt(r['srank']['mean'], 3)} of {r['settings']['feature_dim']}: "
                    "watch the dot product grow over training (DR3 co-adaptation).")
        if kind == "trust-region":
            rep = r["replay"]
            phase, clip = rep["phase"], rep.get("clip_range", 0.2)
            ratio = phase.get("ratio_max_after", phase.get("ratio_max"))
            inside = ratio <= 1 + clip
            return (f"In the replayed update the largest ratio reaches {fmt(ratio, 3)} "
                    f"(1 + eps = {fmt(1 + clip, 3)}) with mean KL {fmt(phase['kl_mean'], 3)}: "
                    + ("the ratios stay within the clip range." if inside else
                       "the clipped objective does not keep the ratios within the clip range."))
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        pass
    return f"{kind}: see the numbers below."


def numbers(kind: str, r: dict[str, Any]) -> str:
    """The probe's main numbers as a table (95% CIs in brackets)."""
    try:
        if kind == "gradients":
            rows = []
            for net in ("policy", "value"):
                for row in r.get(net, []):
                    rows.append([net, row["n"], _iv(row.get("pairwise_cosine")),
                                 _iv(row.get("cosine_to_true")),
                                 _iv(row.get("covariance_trace"))])
            return table(["net", "pairs per estimate", "mean pairwise cosine",
                          "cosine to 'true' gradient", "trace of covariance"], rows, (1,))
        if kind == "values":
            rows = [[name, _iv(r[key].get("relative_error")),
                     _iv(r[key].get("mean_abs_error_ratio")),
                     _iv(r[key].get("explained_variance"))]
                    for key, name in (("vs_gae_targets", "vs GAE targets"),
                                      ("vs_true_returns", "vs true returns (pgscope)"),
                                      ("vs_cut_returns", "vs cut returns (the paper's)"))
                    if key in r]
            return table(["against", "relative error |V - y| / |y|", "mean |V - y| / mean |y|",
                          "explained variance"], rows) + (
                f'<p class="note">{fmt(r.get("states"))} states, '
                f'{fmt(r.get("states_with_true_return"))} with a true return inside the '
                "effective horizon.</p>")
        if kind == "baselines":
            rows = [[row["n"], name, _iv(row[name].get("covariance_trace")),
                     _iv(row[name].get("pairwise_cosine"))]
                    for row in r["rows"] for name in ("agent", "true", "zero", "zero-gae")
                    if name in row]
            return table(["pairs per estimate", "baseline", "trace of covariance",
                          "mean pairwise cosine"], rows, (0,))
        if kind == "landscape":
            a = r["settings"]["steps"]
            header = ["multiple of the step", "surrogate"] + [
                f"true return ({int(c):,} steps)" for c in r["settings"]["counts"]]
            rows = [[fmt(a[i]), fmt(r["surrogate"][i][0])]
                    + [fmt(r["true_return"][str(c)][i][0]) for c in r["settings"]["counts"]]
                    for i in range(len(a))]
            return table(header, rows, tuple(range(len(header)))) + (
                f'<p class="note">Random direction multiple 0 (the slice along the step); '
                f'|step| = {fmt(r.get("delta_norm"), 3)}.</p>')
        if kind == "features":
            rows = [[name, _iv(r.get(key))] for key, name in (
                ("feature_dot", "phi(s) . phi(s')"), ("feature_cosine", "cosine"),
                ("feature_norm", "|phi(s)|"), ("srank", "effective rank (delta 0.01)"))]
            return table(["statistic", "value"], rows)
        if kind == "trust-region":
            rep = r["replay"]
            rows = [[e["epoch"], fmt(e.get("ratio_max_after", e.get("ratio_max"))),
                     fmt(e.get("ratio_min_after", e.get("ratio_min"))), fmt(e["kl_mean"]),
                     fmt(e["kl_max"]), fmt(e.get("clip_fraction_after",
                                                 e.get("clip_fraction")))]
                    for e in rep["per_epoch"]]
            runs = [[f"{x.get('preset')} s{x.get('seed')}", fmt(s.get("ratio_max_median")),
                     fmt(s.get("ratio_max_max")), fmt(s.get("kl_mean_median")),
                     fmt(s.get("kl_mean_max"))]
                    for x in r.get("runs", []) for s in [x.get("summary", {})]]
            return (table(["epoch of the replayed update", "max ratio", "min ratio", "mean KL",
                           "max KL", "clip fraction"], rows, (0, 1, 2, 3, 4, 5))
                    + table(["run", "max ratio (median over iterations)", "max ratio (max)",
                             "mean KL (median)", "mean KL (max)"], runs, (1, 2, 3, 4)))
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return '<p class="note">(no table for this result)</p>'


def probe_folder_html(folder: Path, heading: str, anchor: str) -> str:
    """Every probe result of one output folder: reading, plot, numbers."""
    parts = [f'<h3 id="{esc(anchor)}">{esc(heading)}</h3>']
    for kind, result, png in probe_files(folder):
        parts.append(f'<h4 id="{esc(anchor)}-{esc(kind)}">{esc(kind)}</h4>')
        parts.append(f'<p class="reading">{esc(reading(kind, result))}</p>')
        if png is not None:
            parts.append(image(png, f"{kind} probe plot"))
        parts.append(numbers(kind, result))
        ck = result.get("checkpoint") or {}
        if ck:
            bits = [f"iteration {fmt(ck.get('iteration'))}"]
            if ck.get("env_steps") is not None:
                bits.append(f"{fmt(ck['env_steps'])} env steps")
            if result.get("pgscope_version"):
                bits.append(f"pgscope {result['pgscope_version']}")
            parts.append(f'<p class="note">checkpoint: {esc(", ".join(bits))}</p>')
    return "".join(parts)


def folder_iteration(folder: Path) -> int | None:
    for _, result, _ in probe_files(folder):
        it = (result.get("checkpoint") or {}).get("iteration")
        if isinstance(it, int):
            return it
    digits = "".join(c for c in folder.name if c.isdigit())
    return int(digits) if digits else None
