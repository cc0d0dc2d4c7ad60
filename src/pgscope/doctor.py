"""``pgscope doctor``: named health checks over a run's metrics (and its probes).

Each alarm of docs/design.md section 5 is one :class:`Alarm` in :data:`ALARMS`: a name, the
sign it looks for, its threshold in words, the source of the sign (and of the threshold
where one is published; otherwise the threshold is pgscope's own choice and says so) and
one check function over a :class:`RunData`. A check returns :class:`Finding` objects that
carry the iteration ranges where the alarm fired and the evidence (the numbers).

"Persistently" means: in every one of ``K`` = :data:`WINDOW` (5) consecutive iterations.
Checks that judge learning (explained variance) ignore the first :data:`WARMUP` (10)
iterations, while the value net and the reward statistics are still settling.

Usage::

    from pgscope.doctor import diagnose
    findings = diagnose("runs/hopper-ppo-s0")   # [] for a healthy run

    pgscope doctor runs/hopper-ppo-s0 [--json]   # exit status 1 when an alarm fires
    pgscope doctor runs/my-study                 # every run of a study: a table
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgscope.algos import TYPICAL_KL_TARGET, kl_target
from pgscope.metrics import REGISTRY, metric_value
from pgscope.run import RunDir

#: A critic whose explained variance stays within +-DEAD_EV predicts no state's value
#: better than one number for all of them.
DEAD_EV = 0.01
#: Features of consecutive states this aligned (cosine) have collapsed to one direction.
DEAD_COSINE = 0.999
#: K: "persistently" = in each of K consecutive iterations.
WINDOW = 5
#: Iterations skipped by the checks that need a trained value net.
WARMUP = 10
#: Iterations averaged to smooth the return (return collapse).
SMOOTH = 10
#: action_saturation bound: "nearly all" rather than "most" - a healthy Hopper policy
#: already has 0.46 of its components outside the bounds at 150K steps (bang-bang control
#: is legitimate in locomotion), while a policy locked at the bounds is near 1.
SATURATION = 0.8
#: A negative KL is a bug only beyond float32 rounding of a mean (< 1e-7 in practice).
KL_TOLERANCE = 1e-6
#: max |r - 1| on the first minibatch is exactly 0 on CPU; other backends may round.
RATIO_TOLERANCE = 1e-5

SCHULMAN_2016 = 'Schulman (2016), "Nuts and Bolts of Deep RL Experimentation" (talk)'
PPO_2017 = "Schulman et al. (2017), PPO: the 1.5 x target band of the adaptive KL penalty"
ENGSTROM_2020 = ("Engstrom et al. (2020), Implementation Matters in Deep RL: reward and "
                 "observation clipping at +-10 set the scale the default learning rates "
                 "assume")
OWN = "a pgscope choice"
DR3_2021 = ("Kumar et al. (2021), DR3: Value-Based Deep RL Requires Explicit Regularization: "
            "with bootstrapped targets phi(s) . phi(s') grows until training is unstable")
#: feature-coadaptation: growth factor of feature_dot over the run's last half.
FEATURE_GROWTH = 10.0
#: feature-coadaptation: "still rising" = rank correlation of feature_dot with the iteration
#: over the last 2 x WINDOW logged iterations above this.
FEATURE_RISING = 0.5

#: Keys whose null (NaN/Inf written as null) is legitimate: no episode ended, constant
#: targets, a single action, a batch without action bounds, a batch without a pair of
#: consecutive states (one-step episodes: no critic-feature pair statistics).
NULLABLE = {"return_mean", "return_min", "return_max", "episode_length",
            "explained_variance", "entropy_frac", "action_saturation",
            "feature_dot", "feature_cosine"}


@dataclass
class Finding:
    """One alarm that fired: what, where (iteration ranges, inclusive) and the numbers."""

    alarm: str
    sign: str
    threshold: str
    source: str
    severity: str  # "bug": cannot happen in a correct implementation; "warning"
    ranges: list[tuple[int, int]]
    evidence: str
    values: dict[str, float] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()

    @property
    def first(self) -> int | None:
        return self.ranges[0][0] if self.ranges else None

    @property
    def last(self) -> int | None:
        return self.ranges[-1][1] if self.ranges else None

    def iterations_text(self) -> str:
        """'12-18, 40-44' (or 'run' for a finding about the whole run)."""
        if not self.ranges:
            return "run"
        return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ranges)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranges"] = [list(r) for r in self.ranges]
        d["metrics"] = list(self.metrics)
        return d


class RunData:
    """What the checks read: a run's metrics lines, config, status and probe results."""

    def __init__(self, records: list[dict[str, Any]], config: dict[str, Any] | None = None,
                 status: dict[str, Any] | None = None,
                 probes: dict[str, list[tuple[str, dict[str, Any]]]] | None = None,
                 name: str = "run") -> None:
        self.records = sorted(records, key=lambda r: r["iteration"])
        self.config = dict(config or {})
        self.status = dict(status or {})
        self.probes = dict(probes or {})
        self.name = name
        self.iterations = np.array([r["iteration"] for r in self.records], dtype=int)

    @classmethod
    def load(cls, path: str | Path) -> RunData:
        """Read a run directory (its probes: every ``<kind>.json`` under ``probes/``)."""
        run = RunDir.open(Path(path))
        config = json.loads(run.config_path.read_text()).get("config", {})
        probes: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for f in sorted((run.path / "probes").glob("*/*.json")):
            if f.parent.name.startswith("."):
                continue
            try:
                probes.setdefault(f.stem, []).append((f.parent.name, json.loads(f.read_text())))
            except ValueError:
                continue
        return cls(run.read_metrics(), config, run.current_status(), probes, str(path))

    def series(self, key: str) -> np.ndarray:
        """The key's value per metrics line (NaN where absent or null)."""
        out = np.full(len(self.records), np.nan)
        for i, r in enumerate(self.records):
            v = metric_value(r, key) if key in REGISTRY else r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i] = float(v)
        return out

    def has(self, key: str) -> bool:
        return bool(np.isfinite(self.series(key)).any())

    @property
    def planned_iterations(self) -> int:
        """The planned number of iterations (from the config), else the lines recorded."""
        steps, per = self.config.get("total_steps"), self.config.get("steps_per_iter")
        if steps and per:
            return -(-int(steps) // int(per))
        return len(self.records)

    def kl_target(self) -> tuple[float, str]:
        """The KL the update aims at, as the run's algorithm defines it
        (:func:`pgscope.algos.kl_target`: TRPO's limit, the larger end when it moves;
        ``target_kl`` when a PPO run uses it; else the typical target)."""
        return kl_target(self.config)


@dataclass(frozen=True)
class Alarm:
    """A named health check: ``check(data)`` returns the findings (empty: healthy)."""

    name: str
    sign: str
    threshold: str
    source: str
    metrics: tuple[str, ...]
    check: Callable[[RunData, Alarm], list[Finding]]
    severity: str = "warning"
    #: fixed levels the check compares a metric with, ``(key, level)``: the report draws
    #: them on the panel that shows the key (the KL target's line is drawn per run)
    lines: tuple[tuple[str, float], ...] = ()

    def finding(self, ranges: list[tuple[int, int]], evidence: str,
                **values: float) -> Finding:
        return Finding(self.name, self.sign, self.threshold, self.source, self.severity,
                       ranges, evidence, {k: float(v) for k, v in values.items()}, self.metrics)


# --- helpers ------------------------------------------------------------------------------
def streaks(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Index ranges [a, b] (inclusive) of runs of True at least ``min_len`` long."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            if i - start >= min_len:
                out.append((start, i - 1))
            start = None
    return out


def _iters(data: RunData, idx_ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(int(data.iterations[a]), int(data.iterations[b])) for a, b in idx_ranges]


def _g(x: float) -> str:
    return f"{x:.3g}"


def _persistent(data: RunData, alarm: Alarm, key: str, above: float | None = None,
                below: float | None = None, skip: int = 0) -> list[Finding]:
    """One finding when ``key`` is above (or below) a bound in each of WINDOW
    consecutive iterations (after the first ``skip`` iterations)."""
    x = data.series(key)
    valid = np.isfinite(x) & (data.iterations > skip)
    mask = valid & ((x > above) if above is not None else (x < below))
    ranges = streaks(mask, WINDOW)
    if not ranges:
        return []
    hit = np.concatenate([x[a:b + 1] for a, b in ranges])
    worst = float(hit.max() if above is not None else hit.min())
    bound = above if above is not None else below
    assert bound is not None, "give a bound: above or below"
    side = ">" if above is not None else "<"
    n = sum(b - a + 1 for a, b in ranges)
    return [alarm.finding(_iters(data, ranges),
                          f"{key} {side} {_g(bound)} on {n} iterations in {len(ranges)} "
                          f"streak(s) of >= {WINDOW}; worst {_g(worst)}, median "
                          f"{_g(float(np.median(hit)))}", worst=worst, bound=bound,
                          iterations=n)]


# --- the checks -----------------------------------------------------------------------------
def _check_kl_above_target(data: RunData, alarm: Alarm) -> list[Finding]:
    target, name = data.kl_target()
    out = _persistent(data, alarm, "kl_mean", above=2 * target)
    for f in out:
        f.evidence += f" (target: {name} = {_g(target)})"
    return out


def _check_kl_extreme(data: RunData, alarm: Alarm) -> list[Finding]:
    target, name = data.kl_target()
    mean, mx = data.series("kl_mean"), data.series("kl_max")
    mask = (np.nan_to_num(mean) > 10 * target) | (np.nan_to_num(mx) > 10.0)
    ranges = streaks(mask, 1)
    if not ranges:
        return []
    i = int(np.nanargmax(np.where(mask, np.nan_to_num(mean), -np.inf)))
    return [alarm.finding(_iters(data, ranges),
                          f"kl_mean up to {_g(float(np.nanmax(mean[mask])))} (10 x {name} = "
                          f"{_g(10 * target)}), kl_max up to {_g(float(np.nanmax(mx[mask])))}"
                          f" nats; worst at iteration {int(data.iterations[i])}",
                          kl_mean=float(np.nanmax(mean[mask])),
                          kl_max=float(np.nanmax(mx[mask])))]


def _check_negative_kl(data: RunData, alarm: Alarm) -> list[Finding]:
    keys = ("kl_mean", "kl_max", "approx_kl", "kl_heldout_mean", "kl_heldout_max")
    mask = np.zeros(len(data.records), dtype=bool)
    worst: dict[str, float] = {}
    for key in keys:
        x = data.series(key)
        bad = np.nan_to_num(x, nan=0.0) < -KL_TOLERANCE
        if bad.any():
            worst[key] = float(x[bad].min())
        mask |= bad
    if not mask.any():
        return []
    parts = ", ".join(f"{k} down to {v:.3g}" for k, v in worst.items())
    return [alarm.finding(_iters(data, streaks(mask, 1)),
                          f"{parts} on {int(mask.sum())} iteration(s)", **worst)]


def _check_first_ratio(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("ratio_first_minibatch_dev")
    mask = np.nan_to_num(x) > RATIO_TOLERANCE
    if not mask.any():
        return []
    return [alarm.finding(_iters(data, streaks(mask, 1)),
                          f"ratio_first_minibatch_dev up to {_g(float(x[mask].max()))} on "
                          f"{int(mask.sum())} iteration(s) (must be 0)",
                          worst=float(x[mask].max()))]


def _check_entropy_collapse(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("entropy_frac")
    early = data.iterations <= max(1, data.planned_iterations // 4)
    mask = early & (np.nan_to_num(x, nan=1.0) < 0.1)
    if not mask.any():
        return []
    return [alarm.finding(_iters(data, streaks(mask, 1)),
                          f"entropy_frac down to {_g(float(x[mask].min()))} within the first "
                          f"quarter of the run ({data.planned_iterations // 4} of "
                          f"{data.planned_iterations} iterations)",
                          worst=float(x[mask].min()))]


def _check_entropy_at_max(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("entropy_frac")
    n = len(x)
    if n < 2 * WINDOW or not np.isfinite(x).any():
        return []
    tail = max(WINDOW, n // 2)
    last = x[n - tail:]
    if not (np.isfinite(last).all() and (last >= 0.99).all()):
        return []
    return [alarm.finding(_iters(data, [(n - tail, n - 1)]),
                          f"entropy_frac >= 0.99 in each of the last {tail} iterations "
                          f"(min {_g(float(last.min()))}): the policy is still uniform",
                          minimum=float(last.min()))]


def _check_std_collapse(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("policy_std")
    if not np.isfinite(x).any():
        return []
    initial = float(x[np.isfinite(x)][0])
    mask = np.nan_to_num(x, nan=initial) < 0.1 * initial
    if not mask.any():
        return []
    return [alarm.finding(_iters(data, streaks(mask, 1)),
                          f"policy_std fell from {_g(initial)} (iteration "
                          f"{int(data.iterations[0])}) to {_g(float(x[mask].min()))}",
                          initial=initial, minimum=float(x[mask].min()))]


def _check_explained_variance(data: RunData, alarm: Alarm) -> list[Finding]:
    return _persistent(data, alarm, "explained_variance", below=0.0, skip=WARMUP)


def _check_dead_critic(data: RunData, alarm: Alarm) -> list[Finding]:
    """The value net predicts (about) one number for every state: |explained variance|
    below :data:`DEAD_EV` in each of 2 x WINDOW consecutive iterations after the warm-up,
    or its features collapsed to one direction (``feature_srank`` <= 1 or
    ``feature_cosine`` > :data:`DEAD_COSINE`) in each of WINDOW consecutive iterations.
    Negative explained variance has its own check; this one sees the critic that has
    stopped predicting anything."""
    ev = data.series("explained_variance")
    valid = np.isfinite(ev) & (data.iterations > WARMUP)
    flat = streaks(valid & (np.abs(ev) < DEAD_EV), 2 * WINDOW)
    srank, cosine = data.series("feature_srank"), data.series("feature_cosine")
    collapsed = streaks((np.nan_to_num(srank, nan=np.inf) <= 1)
                        | (np.nan_to_num(cosine) > DEAD_COSINE), WINDOW)
    if not flat and not collapsed:
        return []
    parts = []
    if flat:
        n = sum(b - a + 1 for a, b in flat)
        parts.append(f"|explained_variance| < {_g(DEAD_EV)} on {n} iterations (streaks of "
                     f">= {2 * WINDOW}, after the first {WARMUP})")
    if collapsed:
        n = sum(b - a + 1 for a, b in collapsed)
        parts.append(f"features collapsed (feature_srank <= 1 or feature_cosine > "
                     f"{DEAD_COSINE:g}) on {n} iterations (streaks of >= {WINDOW})")
    return [alarm.finding(_iters(data, sorted(set(flat) | set(collapsed))),
                          "; ".join(parts), flat=bool(flat), collapsed=bool(collapsed))]


def _check_value_scale(data: RunData, alarm: Alarm) -> list[Finding]:
    out = []
    for key in ("value_target_absmax", "advantage_absmax"):
        out += _persistent(data, alarm, key, above=100.0)
    if len(out) > 1:  # one finding: the union of both keys' ranges
        ranges = sorted(set(out[0].ranges) | set(out[1].ranges))
        out = [alarm.finding(ranges, "; ".join(f.evidence for f in out),
                             worst=max(f.values["worst"] for f in out))]
    return out


def _check_saturation(data: RunData, alarm: Alarm) -> list[Finding]:
    return _persistent(data, alarm, "action_saturation", above=SATURATION)


def _smoothed(x: np.ndarray, width: int) -> np.ndarray:
    """Mean over the trailing ``width`` finite values (NaN until ``width`` are seen)."""
    out = np.full(len(x), np.nan)
    seen: list[float] = []
    for i, v in enumerate(x):
        if np.isfinite(v):
            seen.append(float(v))
        if len(seen) >= width:
            out[i] = float(np.mean(seen[-width:]))
    return out


def _iteration_noise(x: np.ndarray) -> float:
    """Robust standard deviation of the return from one iteration to the next: the median
    absolute successive difference / sqrt(2), scaled to a normal std (trend-insensitive)."""
    d = np.abs(np.diff(x))
    return float(1.4826 * np.median(d) / math.sqrt(2)) if len(d) else 0.0


def _check_return_collapse(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("return_mean")
    finite = x[np.isfinite(x)]
    if len(finite) < 3 * SMOOTH:
        return []
    s = _smoothed(x, SMOOTH)
    first, noise = float(finite[:WINDOW].mean()), _iteration_noise(finite)
    peak_i = int(np.nanargmax(s))
    peak, final = float(s[peak_i]), float(finite[-SMOOTH:].mean())
    progress = peak - first
    if progress <= max(3 * noise, 1e-9) or final >= first + 0.5 * progress:
        return []
    lost = (peak - final) / progress
    return [alarm.finding(_iters(data, [(peak_i, len(x) - 1)]),
                          f"return rose from {_g(first)} (first {WINDOW} iterations) to "
                          f"{_g(peak)} (mean of the {SMOOTH} iterations up to "
                          f"{int(data.iterations[peak_i])}) and fell to {_g(final)} over the "
                          f"last {SMOOTH} iterations: {100 * lost:.0f}% of the progress lost "
                          f"(iteration-to-iteration noise {_g(noise)})",
                          first=first, peak=peak, final=final, lost_fraction=lost,
                          noise=noise)]


def _check_clip_fraction(data: RunData, alarm: Alarm) -> list[Finding]:
    return _persistent(data, alarm, "clip_fraction_after", above=0.5)


def _check_nonfinite(data: RunData, alarm: Alarm) -> list[Finding]:
    out = []
    if data.status.get("state") == "diverged":
        it = int(data.status.get("iteration") or (data.iterations[-1] if len(data.iterations)
                                                   else 0))
        out.append(alarm.finding([(it, it)], f"status.json: diverged at iteration {it} "
                                 f"({data.status.get('where', '?')}): "
                                 f"{data.status.get('error', '')}".strip(), iteration=it))
    mask = np.zeros(len(data.records), dtype=bool)
    keys: set[str] = set()
    for i, r in enumerate(data.records):
        bad = {k for k, v in r.items() if v is None and k not in NULLABLE}
        bad |= {k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            mask[i] = True
            keys |= bad
    if mask.any():
        out.append(alarm.finding(_iters(data, streaks(mask, 1)),
                                 f"null (NaN/Inf) values of {', '.join(sorted(keys))} on "
                                 f"{int(mask.sum())} iteration(s)", iterations=int(mask.sum())))
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _check_sps(data: RunData, alarm: Alarm) -> list[Finding]:
    """Env steps per CPU-second of the process (``cpu_s``): a leak or a growing buffer
    costs CPU, while other work on the machine only stretches the wall clock; runs
    written before ``cpu_s`` was logged are judged on their wall-clock ``sps``."""
    cpu = data.series("cpu_s")
    if np.isfinite(cpu).any():
        steps = np.diff(np.concatenate([[0.0], data.series("env_steps")]))
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(cpu > 0, steps / cpu, np.nan)
    else:
        x = data.series("sps")
    ok = np.isfinite(x)
    ok[:1] = False  # the first iteration includes warm-up
    x, it = x[ok], data.iterations[ok]
    if len(x) < 4 * WINDOW:
        return []
    q = len(x) // 4
    early, late = float(np.median(x[:q])), float(np.median(x[-q:]))
    rho = _spearman(it.astype(float), x)
    if late >= 0.5 * early or rho >= -0.5:
        return []
    return [alarm.finding([(int(it[-q]), int(it[-1]))],
                          f"median env steps per CPU-second fell from {early:.0f} (first "
                          f"quarter) to {late:.0f} (last quarter); rank correlation with "
                          f"iteration {rho:.2f}",
                          early=early, late=late, spearman=rho)]


def _check_no_learning(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("return_mean")
    finite = x[np.isfinite(x)]
    if len(finite) < 3 * WINDOW:
        return []
    first, last = finite[:WINDOW], finite[-WINDOW:]
    gain = float(last.mean() - first.mean())
    se = math.sqrt(first.var(ddof=1) / WINDOW + last.var(ddof=1) / WINDOW)
    if gain > 2 * se and gain > 0:
        return []
    return [alarm.finding(_iters(data, [(0, len(x) - 1)]),
                          f"mean return of the last {WINDOW} iterations {_g(float(last.mean()))}"
                          f" vs {_g(float(first.mean()))} for the first {WINDOW} (the initial, "
                          f"untrained policy): gain {_g(gain)}, 2 standard errors {_g(2 * se)}",
                          first=float(first.mean()), last=float(last.mean()), gain=gain,
                          two_se=2 * se)]


def _check_feature_coadaptation(data: RunData, alarm: Alarm) -> list[Finding]:
    x = data.series("feature_dot")
    ok = np.isfinite(x)
    x, it = x[ok], data.iterations[ok]
    if len(x) < 4 * WINDOW:
        return []
    half = len(x) // 2
    start = float(np.median(x[half:half + WINDOW]))
    end = float(np.median(x[-WINDOW:]))
    from scipy.stats import spearmanr  # average ranks: a plateau of ties is not "rising"

    recent = x[-2 * WINDOW:]
    rho = float(spearmanr(it[-2 * WINDOW:], recent).statistic) if np.ptp(recent) > 0 else 0.0
    if start <= 0 or end <= FEATURE_GROWTH * start or rho <= FEATURE_RISING:
        return []
    return [alarm.finding([(int(it[half]), int(it[-1]))],
                          f"median feature_dot rose from {_g(start)} (iterations "
                          f"{int(it[half])}-{int(it[half + WINDOW - 1])}) to {_g(end)} (last "
                          f"{WINDOW}): x{_g(end / start)}; rank correlation with iteration over "
                          f"the last {2 * WINDOW} logged iterations {rho:.2f}",
                          start=start, end=end, growth=end / start, spearman=rho)]


def _probe_results(data: RunData, kind: str) -> list[tuple[str, dict[str, Any]]]:
    return data.probes.get(kind, [])


def _probe_iteration(folder: str, result: dict[str, Any]) -> int:
    it = (result.get("checkpoint") or {}).get("iteration")
    if isinstance(it, int):
        return it
    digits = "".join(c for c in folder if c.isdigit())
    return int(digits) if digits else 0


def _check_probe_value_error(data: RunData, alarm: Alarm) -> list[Finding]:
    out = []
    for folder, r in _probe_results(data, "values"):
        e = (r.get("vs_true_returns") or {}).get("relative_error") or {}
        if e.get("ci_low") is not None and e["ci_low"] > 1.0:
            it = _probe_iteration(folder, r)
            out.append(alarm.finding([(it, it)] if it else [],
                                     f"values probe ({folder}): relative error vs true returns "
                                     f"{_g(e['mean'])} [{_g(e['ci_low'])}, {_g(e['ci_high'])}]",
                                     relative_error=e["mean"], ci_low=e["ci_low"]))
    return out


def _check_probe_baseline(data: RunData, alarm: Alarm) -> list[Finding]:
    out = []
    for folder, r in _probe_results(data, "baselines"):
        rows = r.get("rows") or []
        if not rows:
            continue
        row = rows[-1]
        agent = (row.get("agent") or {}).get("covariance_trace") or {}
        zero = (row.get("zero") or {}).get("covariance_trace") or {}
        if agent.get("ci_low") is not None and zero.get("ci_high") is not None and \
                agent["ci_low"] > zero["ci_high"]:
            it = _probe_iteration(folder, r)
            out.append(alarm.finding(
                [(it, it)] if it else [],
                f"baselines probe ({folder}) at {row.get('n')} pairs: gradient variance with "
                f"the agent's value net {_g(agent['mean'])} [{_g(agent['ci_low'])}, "
                f"{_g(agent['ci_high'])}] > with no baseline {_g(zero['mean'])} "
                f"[{_g(zero['ci_low'])}, {_g(zero['ci_high'])}]",
                agent=agent["mean"], zero=zero["mean"]))
    return out


ALARMS: tuple[Alarm, ...] = (
    Alarm("kl-above-target", "KL after the update persistently too large",
          f"kl_mean > 2 x the KL target in each of {WINDOW} consecutive iterations; the "
          "target: TRPO's max_kl, target_kl when the run uses it (ppo-kl, kl_stop), else "
          f"{TYPICAL_KL_TARGET:g} (the upper end of the typical 0.01 to 0.02)",
          f"{PPO_2017}; watch the KL of every update: {SCHULMAN_2016}",
          ("kl_mean", "kl_max"), _check_kl_above_target),
    Alarm("kl-extreme", "an update replaced the policy instead of adjusting it",
          "kl_mean > 10 x the KL target, or kl_max > 10 nats, in any iteration",
          f"a KL orders of magnitude above the target (design.md section 5); "
          f"{SCHULMAN_2016}; the factor 10 is {OWN}",
          ("kl_mean", "kl_max"), _check_kl_extreme),
    Alarm("negative-kl", "a negative KL (a bug)",
          f"kl_mean, kl_max, approx_kl or kl_heldout_* < -{KL_TOLERANCE:g} nats in any "
          "iteration (float32 rounding of these means stays below 1e-7)",
          "KL is non-negative by definition; the k3 term (r - 1) - log r is >= 0 for every "
          "r > 0", ("kl_mean", "approx_kl"), _check_negative_kl, "bug"),
    Alarm("ratio-not-one", "ratio at the start of an update not 1 (stale log-probabilities)",
          f"ratio_first_minibatch_dev > {RATIO_TOLERANCE:g} in any iteration",
          "an identity: the policy has not moved before the first step (design.md 1.6)",
          ("ratio_first_minibatch_dev",), _check_first_ratio, "bug"),
    Alarm("entropy-collapse", "entropy near zero early in training (discrete actions)",
          "entropy_frac < 0.1 within the first quarter of the planned iterations",
          f"{SCHULMAN_2016}; the bound 0.1 is {OWN}", ("entropy_frac", "entropy"),
          _check_entropy_collapse, lines=(("entropy_frac", 0.1),)),
    Alarm("entropy-at-max", "entropy stuck at its maximum: nothing is learned (discrete)",
          f"entropy_frac >= 0.99 in each of the last half of the iterations (at least "
          f"{WINDOW}; runs of >= {2 * WINDOW} iterations)",
          f"{SCHULMAN_2016}; the bound 0.99 is {OWN}", ("entropy_frac", "entropy"),
          _check_entropy_at_max, lines=(("entropy_frac", 0.99),)),
    Alarm("std-collapse", "the Gaussian policy's standard deviation collapsed",
          "policy_std < 0.1 x its value at the first iteration, in any iteration",
          f"{SCHULMAN_2016} (exploration stops); the factor 0.1 is {OWN}",
          ("policy_std", "entropy"), _check_std_collapse),
    Alarm("explained-variance-negative", "value net worse than a constant",
          f"explained_variance < 0 in each of {WINDOW} consecutive iterations, after the "
          f"first {WARMUP}", SCHULMAN_2016, ("explained_variance",),
          _check_explained_variance, lines=(("explained_variance", 0.0),)),
    Alarm("dead-critic", "the value net predicts one number for every state",
          f"|explained_variance| < {DEAD_EV:g} in each of {2 * WINDOW} consecutive "
          f"iterations after the first {WARMUP}, or feature_srank <= 1 or feature_cosine > "
          f"{DEAD_COSINE:g} in each of {WINDOW} consecutive iterations",
          f"{SCHULMAN_2016} (watch explained variance); collapsed critic features: Kumar et "
          f"al. (2021), DR3; the bounds are {OWN}",
          ("explained_variance", "feature_srank", "feature_cosine"), _check_dead_critic),
    Alarm("values-out-of-scale", "value targets or advantages far outside [-10, 10]",
          f"value_target_absmax or advantage_absmax > 100 (10 x the bound) in each of "
          f"{WINDOW} consecutive iterations", f"{ENGSTROM_2020}; the factor 10 is {OWN}",
          ("value_target_absmax", "advantage_absmax"), _check_value_scale,
          lines=(("value_target_absmax", 100.0), ("advantage_absmax", 100.0))),
    Alarm("actions-saturated", "nearly all sampled actions outside the action bounds",
          f"action_saturation > {SATURATION:g} in each of {WINDOW} consecutive iterations",
          "Irpan (2018), Deep RL Doesn't Work Yet: the Reacher that learns to spin; "
          f"the bound {SATURATION:g} is {OWN} (healthy Hopper: 0.46 at 150K steps)",
          ("action_saturation", "policy_std"),
          _check_saturation, lines=(("action_saturation", SATURATION),)),
    Alarm("return-collapse", "the return fell back after progress",
          f"the mean return of the last {SMOOTH} iterations is below the first {WINDOW}'s "
          f"plus half of the progress to the best {SMOOTH}-iteration mean, the progress "
          "being > 3 x the iteration-to-iteration noise (robust std of successive "
          f"differences); runs with >= {3 * SMOOTH} iterations with episodes",
          f"Vitay, lecture notes on TRPO/PPO (policy collapse); the half is {OWN}",
          ("return_mean",), _check_return_collapse),
    Alarm("clip-fraction-high", "most ratios outside the clip range after the update",
          f"clip_fraction_after > 0.5 in each of {WINDOW} consecutive iterations",
          f"the bound 0.5 is {OWN} (no published threshold): the clip no longer bounds the step",
          ("clip_fraction_after", "clip_fraction"), _check_clip_fraction,
          lines=(("clip_fraction_after", 0.5),)),
    Alarm("non-finite", "NaN or Inf in training",
          "status 'diverged', or a null (NaN/Inf) value of a key that is never null in a "
          "healthy run", "a NaN spreads to everything computed from it (design.md 5)",
          ("policy_loss", "value_loss"), _check_nonfinite, "bug"),
    Alarm("sps-decay", "training slows down",
          f"median env steps per CPU-second of the process (cpu_s; wall-clock sps in runs "
          f"without it) of the last quarter < 0.5 x the first quarter's (iteration 1 "
          f"excluded), with rank correlation with the iteration < -0.5; runs of >= "
          f"{4 * WINDOW + 1} iterations",
          f"engineering (a leak or a growing buffer costs CPU; a busy machine only "
          f"stretches the wall clock); the thresholds are {OWN}",
          ("sps", "cpu_s"), _check_sps),
    Alarm("no-learning", "no learning relative to the initial (random) policy",
          f"mean return of the last {WINDOW} iterations not above the first {WINDOW}'s by "
          f"more than 2 standard errors (runs with >= {3 * WINDOW} iterations with episodes)",
          f"the initial policy is the random-policy baseline (ortho init: near "
          f"state-independent); the 2-standard-error margin is {OWN}", ("return_mean",),
          _check_no_learning),
    Alarm("probe-value-error", "value net worse than predicting 0 (values probe)",
          "relative error vs true returns with its 95% CI above 1",
          "Ilyas et al. (2020), A Closer Look at Deep Policy Gradients (value prediction); "
          f"the bound 1 (the error of V = 0) is {OWN}", ("explained_variance",),
          _check_probe_value_error),
    Alarm("probe-baseline-worse", "the value baseline increases gradient variance",
          "baselines probe at its largest size: variance with the agent's value net, CI "
          "entirely above the variance with no baseline",
          "Ilyas et al. (2020): the agent's value net reduces variance against no baseline",
          ("explained_variance",), _check_probe_baseline),
    # critic feature co-adaptation (the per-iteration feature_dot metric, features_every)
    Alarm(
        "feature-coadaptation", "the value net's features co-adapt: phi(s) . phi(s') keeps growing",
        f"median feature_dot of the last {WINDOW} logged iterations > {FEATURE_GROWTH:g} x the "
        f"median of the first {WINDOW} of the run's last half (positive), and still rising: rank "
        f"correlation with the iteration over the last {2 * WINDOW} > {FEATURE_RISING:g}; runs "
        f"with >= {4 * WINDOW} iterations with feature_dot",
        f"{DR3_2021}; the factor {FEATURE_GROWTH:g} and the trend test are {OWN}",
        ("feature_dot", "feature_srank"), _check_feature_coadaptation),
)

#: The alarms by name.
ALARM_BY_NAME: dict[str, Alarm] = {a.name: a for a in ALARMS}


def check(data: RunData, alarms: Iterable[Alarm] = ALARMS) -> list[Finding]:
    """Every finding of ``alarms`` on ``data``, in alarm order."""
    out: list[Finding] = []
    for alarm in alarms:
        out += alarm.check(data, alarm)
    return out


def diagnose(path: str | Path) -> list[Finding]:
    """The findings of every alarm on a run directory ([] for a healthy run)."""
    return check(RunData.load(path))


def is_study(path: str | Path) -> bool:
    """A study directory, or the seed runs of ``pgscope train --seeds`` (a study of one
    config; :func:`pgscope.study.spec.is_study_dir`)."""
    from pgscope.study.spec import is_study_dir

    return is_study_dir(path)


def diagnose_study(path: str | Path) -> list[dict[str, Any]]:
    """One row per planned run of a study: label, env, seed, state, findings."""
    from pgscope.study import open_study

    spec = open_study(path)
    rows = []
    for r in spec.runs():
        run_path = Path(path) / r.rel_path
        row: dict[str, Any] = dict(run=r.rel_path, label=r.label, env=r.env_id, seed=r.seed)
        if not (run_path / "config.json").exists():
            rows.append(dict(row, state="new", findings=[]))
            continue
        data = RunData.load(run_path)
        rows.append(dict(row, state=str(data.status.get("state", "unknown")),
                         findings=check(data)))
    return rows


# --- output -------------------------------------------------------------------------------
def format_findings(findings: list[Finding], name: str = "run") -> str:
    """Plain text: one block per finding (alarm, threshold, source, iterations, evidence)."""
    if not findings:
        return f"{name}: healthy - no alarm fired ({len(ALARMS)} checks)."
    lines = [f"{name}: {len(findings)} alarm(s) fired"]
    for f in findings:
        lines += [f"\n[{f.severity}] {f.alarm}: {f.sign}",
                  f"  iterations: {f.iterations_text()}",
                  f"  evidence:   {f.evidence}",
                  f"  threshold:  {f.threshold}",
                  f"  source:     {f.source}"]
    return "\n".join(lines)


def format_study(rows: list[dict[str, Any]]) -> str:
    """A table: one line per run with the alarms it fired; then a count per alarm."""
    width = max([3, *(len(r["run"]) for r in rows)])
    lines = [f"{'run':<{width}}  {'state':<11} alarms"]
    counts: dict[str, int] = {}
    for r in rows:
        names = sorted({f.alarm for f in r["findings"]})
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        lines.append(f"{r['run']:<{width}}  {r['state']:<11} {', '.join(names) or '-'}")
    lines.append("")
    if counts:
        lines.append("runs per alarm: " + ", ".join(f"{k} {v}/{len(rows)}"
                                                    for k, v in sorted(counts.items())))
    else:
        lines.append(f"no alarm fired in any of {len(rows)} runs.")
    return "\n".join(lines)


def alarms_table() -> list[dict[str, str]]:
    """The registry as rows (name, sign, threshold, source, severity) for docs and reports."""
    return [dict(name=a.name, sign=a.sign, threshold=a.threshold, source=a.source,
                 severity=a.severity) for a in ALARMS]
