"""PNG plots of probe results (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _band(ax, x, rows, key, label, color):
    mean = [r[key]["mean"] for r in rows]
    lo = [r[key]["ci_low"] for r in rows]
    hi = [r[key]["ci_high"] for r in rows]
    ax.plot(x, mean, "o-", color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2)


def _cosine_limits(ax, rows_list, keys) -> None:
    """y limits that show every mean and CI end, negative cosines included."""
    lows = [r[k]["ci_low"] for rows in rows_list for r in rows for k in keys]
    lows += [r[k]["mean"] for rows in rows_list for r in rows for k in keys]
    low = min([-0.05, *(v - 0.05 for v in lows if v == v)])
    ax.set_ylim(max(low, -1.05), 1.05)
    ax.axhline(0, color="grey", lw=0.8)


def plot_gradients(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    keys = ("pairwise_cosine", "cosine_to_true")
    for col, net in enumerate(("policy", "value")):
        rows = result[net]
        x = [r["n"] for r in rows]
        ax = axes[0, col]
        _band(ax, x, rows, "pairwise_cosine", "mean pairwise cosine of the K estimates", "C0")
        _band(ax, x, rows, "cosine_to_true", "cosine to the 'true' gradient", "C1")
        ax.axvline(2048, color="grey", ls=":", lw=1)
        _cosine_limits(ax, [rows], keys)
        ax.set_ylabel("cosine similarity")
        ax.set_title(f"{net} gradient ({result['settings']['env_id']})")
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[1, col]
        _band(ax, x, rows, "covariance_trace", "trace of covariance of the K estimates", "C2")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_ylabel("trace of covariance (log scale)")
        ax.set_xlabel("state-action pairs per estimate (dotted: 2,048)")
        ax.legend(fontsize=8)
    axes[0, 0].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_values(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [("vs_gae_targets", "vs GAE targets"),
            ("vs_true_returns", "vs true returns\n(pgscope: uncut only)"),
            ("vs_cut_returns", "vs cut returns\n(the paper's)")]
    bars = [(key, label) for key, label in bars if key in result]  # older results: two
    for i, (key, _) in enumerate(bars):
        r = result[key]["relative_error"]
        ax.bar(i, r["mean"], yerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
               color=f"C{i}", capsize=6)
    ax.set_xticks(range(len(bars)), [label for _, label in bars])
    ax.set_ylabel("mean relative error |V - y| / |y|")
    ax.set_title(f"value prediction ({result['settings']['env_id']}, "
                 f"{result['states_with_true_return']} states with true returns)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _after(record: dict, key: str) -> list | float | None:
    """``record[key + "_after"]``, or ``record[key]`` in results written before the
    ``*_after`` keys (the same after-update statistic under its older name)."""
    return record.get(f"{key}_after", record.get(key))


def _clips(run: dict) -> bool:
    """Whether the run's loss clips the ratio (PPO clip with eps < 1): from its config when
    the run directory is readable, else from the preset name."""
    try:
        cfg = json.loads((Path(run["run"]) / "config.json").read_text())["config"]
        return cfg.get("algo") == "ppo" and cfg.get("ppo_loss") == "clip" and \
            float(cfg.get("clip_eps", 1e32)) < 1
    except (OSError, KeyError, TypeError, ValueError):
        return run.get("preset") in ("ppo", "ppo-m")


def plot_trust_region(runs: list[dict], replay: dict | None, path: Path) -> None:
    ncols = 3 if replay else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.2))
    for i, run in enumerate(runs):
        s = run["series"]
        label = f"{run['preset']} seed {run['seed']}"
        axes[0].plot(s["env_steps"], _after(s, "ratio_max"), color=f"C{i}", label=label, lw=1)
        axes[1].plot(s["env_steps"], s["kl_mean"], color=f"C{i}", label=label, lw=1)
    clipped = [r for r in runs if _clips(r)]
    if clipped:  # no clip line for runs whose loss does not clip
        clip = clipped[0]["clip_range"]
        axes[0].axhline(1 + clip, color="k", ls="--", lw=1,
                        label=f"1 + eps = {1 + clip:g} (PPO clip)")
    axes[0].set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 1.5, not 1.5 x 10^0
    axes[0].yaxis.set_major_formatter(plain)
    low, high = axes[0].get_ylim()
    axes[0].yaxis.set_minor_formatter(plain if high < 10 * low else
                                      matplotlib.ticker.NullFormatter())
    axes[0].set_title("max ratio pi_new / pi_old after each update", fontsize=10)
    axes[0].set_ylabel("max ratio over the batch (log scale)")
    axes[1].set_title("mean KL(old || new) after each update", fontsize=10)
    axes[1].set_ylabel("mean KL (nats)")
    for ax in axes[:2]:
        ax.set_xlabel("env steps")
        ax.legend(fontsize=8, title="one line per run", title_fontsize=8)
    if replay:
        ep = [e["epoch"] for e in replay["per_epoch"]]
        ax = axes[2]
        ax.plot(ep, [_after(e, "ratio_max") for e in replay["per_epoch"]], "o-", color="C0",
                label="max ratio (left axis)")
        if _clips(replay):
            ax.plot(ep, [1 + replay["clip_range"]] * len(ep), "k--", lw=1,
                    label=f"1 + eps = {1 + replay['clip_range']:g} (left axis)")
        ax.set_ylabel("max ratio pi_new / pi_old")
        ax2 = ax.twinx()
        ax2.plot(ep, [e["kl_mean"] for e in replay["per_epoch"]], "s-", color="C3",
                 label="mean KL (right axis)")
        ax2.set_ylabel("mean KL (nats)")
        ax.set_xlabel(f"epoch (replay of iteration {replay['checkpoint_iteration'] + 1})")
        ax.set_title("within one update, after each epoch", fontsize=10)
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left",
                  fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_baselines(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["rows"]
    x = [r["n"] for r in rows]
    labels = {"agent": "agent's value net", "true": "'true' value (MC fit)",
              "zero": "zero: discounted returns (paper)", "zero-gae": "zero-gae: GAE, V = 0"}
    names = [b for b in labels if b in rows[0]]  # older results: no zero-gae
    for i, b in enumerate(names):
        sub = [r[b] for r in rows]
        _band(axes[0], x, sub, "covariance_trace", labels[b], f"C{i}")
        _band(axes[1], x, sub, "pairwise_cosine", labels[b], f"C{i}")
    axes[0].set_yscale("log")
    axes[0].set_title("policy-gradient variance (trace of covariance)")
    axes[0].set_ylabel("trace of covariance (log scale)")
    axes[1].set_title("mean pairwise cosine")
    axes[1].set_ylabel("cosine similarity")
    _cosine_limits(axes[1], [[r[b] for r in rows] for b in names], ("pairwise_cosine",))
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("state-action pairs per estimate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slice_panel(ax, result: dict, along_step: bool) -> None:
    """The surrogate (left axis) and the true returns (right axis, one line per count) on
    one line of the grid, with bands of the 95% intervals over the random directions where
    the result has them."""
    settings = result["settings"]
    counts = settings["counts"]
    x = settings["steps"] if along_step else settings["directions"]
    intervals = result.get("intervals", {})

    def line(z: list[list[float]]) -> list[float]:
        return [row[0] for row in z] if along_step else list(z[0])

    def band(ax, low_high: dict | None, color: str) -> None:
        if low_high is not None:
            ax.fill_between(x, line(low_high["ci_low"]), line(low_high["ci_high"]),
                            color=color, alpha=0.2, lw=0)

    ax.plot(x, line(result["surrogate"]), "k-o", label="surrogate")
    band(ax, intervals.get("surrogate"), "k")
    ax.set_ylabel("surrogate")
    ax2 = ax.twinx()
    for k, c in enumerate(counts):
        ax2.plot(x, line(result["true_return"][str(c)]), "--s", color=f"C{k}",
                 label=f"true return ({int(c):,})")
        band(ax2, intervals.get("true_return", {}).get(str(c)), f"C{k}")
    ax2.set_ylabel("true mean return")
    if along_step:
        ax.set_xlabel("multiples of the update step")
        ax.set_title(f"along the step (|step| = {result['delta_norm']:.3g})", fontsize=9)
    else:
        ax.set_xlabel("multiples of the random direction (unit L2 norm)")
        ax.set_title(f"along the random directions, step multiple {settings['steps'][0]:g}",
                     fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)


def plot_landscape(result: dict, path: Path) -> None:
    counts = result["settings"]["counts"]
    a, b = result["settings"]["steps"], result["settings"]["directions"]
    n_dirs = result["settings"].get("random_directions", 1)
    over = f", mean of {n_dirs} directions" if n_dirs > 1 else ""
    panels = [(f"surrogate on the training batch{over}", result["surrogate"])] + [
        (f"true mean return, {int(c):,} steps{over}", result["true_return"][str(c)])
        for c in counts]
    slices = [True] + ([False] if len(b) > 1 else [])  # along the step, along directions
    n = len(panels) + len(slices)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)

    def edges(v: list[float]) -> tuple[float, float]:
        half = (v[-1] - v[0]) / (2 * (len(v) - 1)) if len(v) > 1 else 0.5
        return v[0] - half, v[-1] + half

    extent = (*edges(list(b)), *edges(list(a)))  # cells centred on the grid values
    for ax, (title, z) in zip(axes, panels, strict=False):
        im = ax.imshow(z, origin="lower", aspect="auto", extent=extent, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("random direction (unit L2 norm)")
        ax.set_ylabel("multiples of the update step")
        fig.colorbar(im, ax=ax)
    for ax, along_step in zip(axes[len(panels):n], slices, strict=True):
        _slice_panel(ax, result, along_step)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
