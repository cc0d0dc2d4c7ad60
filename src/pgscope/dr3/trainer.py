"""Offline Q-function training for the DR3 experiment: every (variant, seed) member of an
experiment as ONE batched model.

**The Q-network.** ``Q(s, a) = w . phi(s, a) + b`` with ``phi`` the last hidden layer of a
ReLU MLP (default 256 x 256, as in the DR3 paper) on ``x(s, a)``: the preprocessed
observation concatenated with the action (one-hot for discrete actions), or, with
``encoding="outer"``, the flattened outer product ``s a^T`` (with one-hot states and
actions that is the one-hot of the pair, so a network without hidden layers is a
tabular Q; the tests use it). Without hidden layers ``phi = x``.

**The loss** of a member, on a minibatch of ``B`` transitions::

    y   = r + gamma * (1 - terminated) * Q_target(s', a')      (no gradient)
    L   = mean (Q(s, a) - y)^2  +  c * mean_{s' not terminal} |phi(s, a) . phi(s', a')|

with ``a'`` the dataset's next action (``sarsa``) or a fresh sample of the behaviour policy
at ``s'`` drawn at every step (``td``, ``dr3:c``); ``c = 0`` but for ``dr3:c``. ``td:K``
backs up from another policy than the behaviour one, the behaviour policy with its spread
scaled by ``K`` (Gaussian: ``a' = mean + K std noise``, clipped to the bounds as the
behaviour policy's; categorical: logits divided by ``K``); ``td:0`` takes the behaviour
policy's mean (argmax) action, so it evaluates that deterministic policy off-policy, and
``td:1`` is ``td``. Both
features of the DR3 term come from the online network and the gradient flows through
both (the paper's explicit regularizer ``sum_i phi(s_i, a_i) . phi(s'_i, a'_i)``; the
absolute value, as in the authors' released agent, changes nothing here: ReLU features
are non-negative). The term averages over the minibatch's pairs whose ``s'`` is not
terminal (:func:`pgscope.features.dr3_pairs`, the on-policy term's rule): a terminal
``s'`` has no ``Q(s', a')`` in the target. A time-limit truncation does not terminate:
``y`` bootstraps from the true final state, and its pair stays in the term.
The target network follows the online one by Polyak averaging (``polyak:tau``:
``theta' <- (1 - tau) theta' + tau theta`` after every step) or by a copy every ``k``
steps (``copy:k``).

**Batching.** The weights of the ``M`` members are stacked (``(M, in, out)``) and every
layer is one ``torch.baddbmm``; the loss is the sum of the members' losses, so each
member's gradient is its own, and one Adam over the stacked tensors is exactly ``M``
Adams (Adam is elementwise). Each member draws its initial weights, its minibatches
(uniform with replacement) and its TD actions from its own generators seeded by its seed
alone, so a member trains the same whatever else is in the batch (tested to 1e-5), and
members of different variants with the same seed share initial weights and minibatches.

**Logs** (every ``log_every`` steps, one JSON line per member in ``members/NAME.jsonl``):
``td_loss`` (mean over the steps since the last line), on the step's minibatch pairs
``(s, a), (s', a')`` with the online network: ``feature_dot`` and ``feature_cosine``
(means over the pairs the DR3 term takes: ``s'`` not terminal), ``feature_norm`` (of
``phi(s, a)``, every row); ``feature_srank`` (delta 0.01) of ``phi(s, a)`` on a fixed
evaluation set of dataset pairs, the first ``feature_srank_rows`` = min(transitions,
:data:`pgscope.features.SRANK_EVAL_ROWS`) of a permutation seeded by 0, the same for
every member, step and ``--batch``; on the held-out reference pairs ``q_abs_error`` =
mean ``|Q - Q_MC|`` / mean ``|Q_MC|`` and ``q_signed_error`` = mean ``(Q - Q_MC)`` /
mean ``|Q_MC|``; ``q_mean``: mean Q over a fixed sample of dataset pairs.
:mod:`pgscope.features` computes the feature statistics.

**Resume.** ``checkpoint.pt`` (every ``checkpoint_every`` steps, a multiple of
``log_every``; atomic) holds the stacked weights, the target weights, Adam's state and
every generator's state; a killed experiment re-run with the same command continues from
it, dropping log lines past it, and writes what an uninterrupted one would have.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pgscope.dr3.dataset import OfflineDataset, OfflineError, load_dataset
from pgscope.features import (
    SRANK_EVAL_ROWS,
    dr3_mean,
    dr3_pairs,
    feature_cosine,
    feature_dot,
    feature_norm,
    srank,
)

EXPERIMENT_FILE = "experiment.json"
CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"
MEMBERS_DIR = "members"
FORMAT = "pgscope-dr3-experiment"
ENCODINGS = ("concat", "outer")

Params = list[torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """How a member backs up: ``backup`` 'dataset' (SARSA) or 'policy' (TD, fresh
    ``a' ~ pi``), the DR3 coefficient ``coef`` (0 = none) and the TD policy's ``spread``
    (the behaviour policy's std or temperature times ``spread``; 1 = the behaviour policy)."""

    name: str
    backup: str
    coef: float = 0.0
    spread: float = 1.0


def parse_variants(text: str | Sequence[str]) -> tuple[Variant, ...]:
    """``'sarsa,td,td:0,dr3:0.03'`` (or a list of such names) -> variants; ``dr3:c`` is TD
    plus ``c * mean phi(s, a) . phi(s', a')`` and needs its ``c > 0``; ``td:K`` is TD from
    the behaviour policy with its spread scaled by ``K >= 0`` (module doc)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise OfflineError("give at least one variant: sarsa, td, td:K or dr3:C (e.g. "
                           "dr3:0.03).")
    out = []
    for name in names:
        if name in ("sarsa", "td"):
            out.append(Variant(name, "dataset" if name == "sarsa" else "policy"))
            continue
        kind, _, value = name.partition(":")
        try:
            x = float(value) if kind in ("dr3", "td") else math.nan
        except ValueError:
            x = math.nan
        if kind == "dr3" and x > 0 and math.isfinite(x):
            out.append(Variant(f"dr3:{x:g}", "policy", x))
        elif kind == "td" and x >= 0 and math.isfinite(x):
            out.append(Variant("td" if x == 1 else f"td:{x:g}", "policy", spread=x))
        else:
            raise OfflineError(f"unknown variant '{name}': use sarsa, td, td:K with a spread "
                               "K >= 0 (e.g. td:0) or dr3:C with a coefficient C > 0 (e.g. "
                               "dr3:0.03).")
    if len({v.name for v in out}) < len(out):
        raise OfflineError(f"variants repeat: {', '.join(names)}.")
    return tuple(out)


def parse_target(text: str) -> tuple[str, float]:
    """``polyak:tau`` (0 < tau <= 1) or ``copy:k`` (k >= 1 steps)."""
    kind, _, value = text.partition(":")
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if kind == "polyak" and 0 < x <= 1:
        return kind, x
    if kind == "copy" and x >= 1 and x.is_integer():
        return kind, x
    raise OfflineError(f"--target '{text}': use polyak:TAU with 0 < TAU <= 1 (e.g. "
                       "polyak:0.005) or copy:K with a whole K >= 1 (e.g. copy:2000).")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines an experiment's training (the CLI's options)."""

    variants: tuple[str, ...] = ("sarsa", "td", "dr3:0.03")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100_000
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    batch: int = 256
    target: str = "polyak:0.005"
    encoding: str = "concat"
    log_every: int = 1000
    checkpoint_every: int = 10_000
    q_mean_pairs: int = 4096

    def check(self) -> tuple[Variant, ...]:
        """One clear error for any bad setting; returns the parsed variants."""
        variants = parse_variants(self.variants)
        parse_target(self.target)
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise OfflineError(f"seeds must be distinct and at least one, got {self.seeds}.")
        for name, value in (("--steps", self.steps), ("--batch", self.batch),
                            ("--log-every", self.log_every),
                            ("--checkpoint-every", self.checkpoint_every),
                            ("q_mean_pairs", self.q_mean_pairs)):
            if value < 1:
                raise OfflineError(f"{name} must be at least 1, got {value}.")
        if self.checkpoint_every % self.log_every:
            raise OfflineError(f"--checkpoint-every ({self.checkpoint_every}) must be a "
                               f"multiple of --log-every ({self.log_every}).")
        if any(h < 1 for h in self.hidden):
            raise OfflineError(f"hidden sizes must be positive, got {self.hidden}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OfflineError(f"--lr must be positive, got {self.lr}.")
        if self.encoding not in ENCODINGS:
            raise OfflineError(f"encoding '{self.encoding}': choose from "
                               f"{', '.join(ENCODINGS)}.")
        return variants

    def identity(self) -> dict[str, Any]:
        """What a resumed experiment must share with the one on disk (not ``steps``)."""
        d = asdict(self)
        d.pop("steps")
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class Member:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name.replace(':', '')}_s{self.seed}"


# --- the stacked network -----------------------------------------------------------------
def init_params(sizes: Sequence[int], seeds: Sequence[int]) -> Params:
    """Stacked weights ``[W_1, b_1, ..., W_L, b_L]`` (``W_l``: ``(M, in, out)``, ``b_l``:
    ``(M, 1, out)``), member ``m`` drawn from a generator seeded by ``seeds[m]`` alone,
    with ``nn.Linear``'s default distribution ``U(-1/sqrt(in), 1/sqrt(in))``."""
    per_member = []
    for seed in seeds:
        g = torch.Generator().manual_seed(_stream(seed, 0))
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)
            layers.append((torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound)
            layers.append((torch.rand(1, fan_out, generator=g) * 2 - 1) * bound)
        per_member.append(layers)
    return [torch.stack([m[i] for m in per_member]) for i in range(len(per_member[0]))]


def q_forward(params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, phi)`` of the stacked network on ``x``: ``(M, B, in) -> (M, B), (M, B, d)``."""
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers - 1):
        h = torch.relu(torch.baddbmm(params[2 * i + 1], h, params[2 * i]))
    q = torch.baddbmm(params[-1], h, params[-2]).squeeze(-1)
    return q, h


def encode(obs: torch.Tensor, action: torch.Tensor, encoding: str) -> torch.Tensor:
    """The network's input ``x(s, a)`` (module doc); ``action`` already one-hot when
    discrete."""
    if encoding == "outer":
        return (obs.unsqueeze(-1) * action.unsqueeze(-2)).flatten(-2)
    return torch.cat([obs, action], -1)


def dr3_term(phi: torch.Tensor, phi_next: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``mean_i |phi(s_i, a_i) . phi(s'_i, a'_i)|`` per member over the pairs with
    ``pairs[m, i]`` (:func:`pgscope.features.dr3_pairs`: ``s'_i`` not terminal), 0 when
    there is none: ``(M, B, d), (M, B) -> (M,)``."""
    return dr3_mean(phi, phi_next, pairs, "abs")


def member_losses(params: Params, target: Params, x: torch.Tensor, x_next: torch.Tensor,
                  reward: torch.Tensor, not_terminated: torch.Tensor, gamma: float,
                  coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module doc's loss for every member on its minibatch (``x``: ``(M, B, in)``
    inputs at ``(s, a)``, ``x_next`` at the backup pair ``(s', a')``, ``reward`` and
    ``not_terminated``: ``(M, B)``, ``coef``: ``(M,)`` DR3 coefficients). Returns the
    sum over members (what is differentiated), the TD losses ``(M,)`` and ``phi(s, a)``.
    The online features at ``(s', a')`` are computed only for members with ``coef > 0``;
    the DR3 term leaves out the pairs with ``not_terminated == 0``."""
    with torch.no_grad():
        q_next, _ = q_forward(target, x_next)
        y = reward + gamma * not_terminated * q_next
    q, phi = q_forward(params, x)
    td_loss = (q - y).pow(2).mean(-1)
    loss = td_loss.sum()
    on = torch.nonzero(coef > 0).flatten()
    if len(on):
        every = len(on) == len(coef)
        sub = params if every else [p[on] for p in params]
        _, phi_next = q_forward(sub, x_next if every else x_next[on])
        pairs = dr3_pairs(not_terminated == 0)
        loss = loss + (coef[on] * dr3_term(phi if every else phi[on], phi_next,
                                           pairs if every else pairs[on])).sum()
    return loss, td_loss, phi


def _stream(seed: int, stream: int) -> int:
    """A 63-bit seed for ``stream`` (0 init, 1 minibatches, 2 TD actions) of ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# --- the data, as the trainer sees it ------------------------------------------------------
class TrainingData:
    """The dataset's tensors in the trainer's form: encoded actions, the TD sampler."""

    def __init__(self, data: OfflineDataset, encoding: str, q_mean_pairs: int) -> None:
        t = data.tensors
        self.encoding = encoding
        self.discrete = data.discrete
        self.n = len(data)
        self.n_actions = int(data.meta["action_dim"])
        self.obs = t["obs"].float()
        self.next_obs = t["next_obs"].float()
        self.action = self.encode_action(t["action"])
        self.next_action = self.encode_action(t["next_action"])
        self.reward = t["reward"].float()
        self.not_terminated = (~t["terminated"].bool()).float()
        self.dr3_pairs = dr3_pairs(t["terminated"])
        self.behaviour = {k: t[k] for k in ("next_mean", "std", "low", "high", "next_logits")
                          if k in t}
        ref = data.reference
        self.ref_x = encode(ref["obs"].float(), self.encode_action(ref["action"]), encoding)
        self.ref_q = ref["q"].float()
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(self.n, generator=g)
        idx = perm[:q_mean_pairs]
        self.q_mean_x = encode(self.obs[idx], self.action[idx], encoding)
        rows = perm[:SRANK_EVAL_ROWS]  # the fixed evaluation set of feature_srank
        self.srank_x = encode(self.obs[rows], self.action[rows], encoding)

    def encode_action(self, a: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return F.one_hot(a.long(), self.n_actions).float()
        return a.float()

    def sample_next_actions(self, idx: torch.Tensor, generators: Sequence[torch.Generator],
                            spread: torch.Tensor) -> torch.Tensor:
        """Fresh ``a' ~ pi(.|s')`` at the rows ``idx`` (``(K, B)``), one generator and one
        ``spread`` (``(K,)``, :class:`Variant`) per row of members, encoded: ``(K, B, A)``."""
        b = self.behaviour
        if self.discrete:
            u = torch.stack([torch.rand(idx.shape[1], self.n_actions, generator=g)
                             for g in generators])
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
            logits = b["next_logits"][idx]
            k = spread[:, None, None]
            sampled = (logits / k.clamp_min(1e-30) + gumbel).argmax(-1)
            choice = torch.where(k[..., 0] > 0, sampled, logits.argmax(-1))
            return F.one_hot(choice, self.n_actions).float()
        noise = torch.stack([torch.randn(idx.shape[1], self.n_actions, generator=g)
                             for g in generators])
        a = b["next_mean"][idx] + b["std"] * (spread[:, None, None] * noise)
        if "low" in b:
            a = torch.maximum(torch.minimum(a, b["high"]), b["low"])
        return a


# --- the experiment ------------------------------------------------------------------------
@dataclass
class OfflineResult:
    """What :func:`train_offline` leaves: the members, their final stacked weights, the
    last log line of each, and the measured speed."""

    members: list[Member]
    params: Params
    last: dict[str, dict[str, Any]]
    steps_per_s: float
    out: Path | None = None
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _member_generators(members: Sequence[Member], stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_stream(m.seed, stream)) for m in members]


def _read_lines(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; everything after the checkpoint is redone
        if record.get("step", math.inf) <= upto:
            lines.append(record)
    return lines


def _prepare_out(out: Path, dataset_path: Path | None, data: OfflineDataset,
                 settings: TrainSettings, members: list[Member]) -> None:
    """Create the experiment directory, or check that the one there is this experiment."""
    from pgscope import __version__
    from pgscope.run import atomic_write_json

    if out.exists() and not out.is_dir():
        raise OfflineError(f"--out '{out}' is a file; an experiment is a directory.")
    meta_path = out / EXPERIMENT_FILE
    if meta_path.exists():
        saved = json.loads(meta_path.read_text())
        if saved.get("settings") != settings.identity() or \
                saved.get("dataset_created") != data.meta.get("created"):
            raise OfflineError(f"'{out}' holds an experiment with other settings or another "
                               "dataset; resume it with its own command or choose another "
                               "--out.")
        saved["steps"] = max(int(saved.get("steps", 0)), settings.steps)
        atomic_write_json(meta_path, saved)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / MEMBERS_DIR).mkdir(exist_ok=True)
    atomic_write_json(meta_path, {
        "format": FORMAT, "pgscope_version": __version__,
        "dataset": None if dataset_path is None else str(dataset_path),
        "dataset_created": data.meta.get("created"),
        "dataset_meta": {k: data.meta.get(k) for k in ("env_id", "run", "iteration",
                                                      "transitions", "gamma", "seed")},
        "settings": settings.identity(), "steps": settings.steps,
        "members": [{"name": m.name, "variant": m.variant.name, "backup": m.variant.backup,
                     "coef": m.variant.coef, "spread": m.variant.spread, "seed": m.seed}
                    for m in members],
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })


def train_offline(dataset: str | Path | OfflineDataset, settings: TrainSettings,
                  out: str | Path | None = None, *, progress: bool = True,
                  on_log: Callable[[int, dict[str, dict[str, Any]]], None] | None = None
                  ) -> OfflineResult:
    """Train every (variant, seed) member of ``settings`` on ``dataset`` (a directory or a
    loaded :class:`OfflineDataset`) as one batched model. With ``out``, write the
    experiment directory (module doc) and resume from its checkpoint when there is one.
    ``on_log(step, lines)`` sees each round of log lines."""
    variants = settings.check()
    dataset_path = None if isinstance(dataset, OfflineDataset) else Path(dataset)
    data = dataset if isinstance(dataset, OfflineDataset) else load_dataset(dataset)
    members = [Member(v, s) for v in variants for s in settings.seeds]
    out_path = None if out is None else Path(out)
    if out_path is not None:
        _prepare_out(out_path, dataset_path, data, settings, members)
    td = TrainingData(data, settings.encoding, settings.q_mean_pairs)
    in_dim = int(td.ref_x.shape[-1])
    params = [p.requires_grad_() for p in
              init_params([in_dim, *settings.hidden, 1], [m.seed for m in members])]
    target = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=settings.lr, fused=True)
    batch_gens = _member_generators(members, 1)
    action_gens = _member_generators(members, 2)
    start = 0
    history: dict[str, list[dict[str, Any]]] = {m.name: [] for m in members}
    if out_path is not None and (out_path / CHECKPOINT_FILE).exists():
        start = _restore(out_path / CHECKPOINT_FILE, params, target, optimizer, batch_gens,
                         action_gens)
        for m in members:
            history[m.name] = _read_lines(out_path / MEMBERS_DIR / f"{m.name}.jsonl", start)
            _rewrite(out_path / MEMBERS_DIR / f"{m.name}.jsonl", history[m.name])

    M = len(members)
    kind, value = parse_target(settings.target)
    coef = torch.tensor([m.variant.coef for m in members])
    spread = torch.tensor([m.variant.spread for m in members])
    sarsa_idx = [i for i, m in enumerate(members) if m.variant.backup == "dataset"]
    td_idx = [i for i, m in enumerate(members) if m.variant.backup == "policy"]
    gamma = data.gamma
    loss_sum = torch.zeros(M)
    steps_since = 0
    t0, done_at_start = time.perf_counter(), start
    last: dict[str, dict[str, Any]] = {m.name: h[-1] for m in members
                                       if (h := history[m.name])}
    bar = tqdm(total=settings.steps, initial=start, desc="dr3 train", unit="step",
               disable=not progress, mininterval=1.0)
    try:
        for step in range(start + 1, settings.steps + 1):
            idx = torch.stack([torch.randint(td.n, (settings.batch,), generator=g)
                               for g in batch_gens])
            x = encode(td.obs[idx], td.action[idx], settings.encoding)
            next_a = torch.empty(M, settings.batch, td.action.shape[-1])
            if sarsa_idx:
                next_a[sarsa_idx] = td.next_action[idx[sarsa_idx]]
            if td_idx:
                next_a[td_idx] = td.sample_next_actions(idx[td_idx],
                                                        [action_gens[i] for i in td_idx],
                                                        spread[td_idx])
            x_next = encode(td.next_obs[idx], next_a, settings.encoding)
            loss, td_loss, phi = member_losses(params, target, x, x_next, td.reward[idx],
                                               td.not_terminated[idx], gamma, coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if kind == "polyak":
                    torch._foreach_lerp_(target, [p.detach() for p in params], value)
                elif step % int(value) == 0:
                    torch._foreach_copy_(target, [p.detach() for p in params])
            loss_sum += td_loss.detach()
            steps_since += 1
            bar.update()
            if step % settings.log_every == 0 or step == settings.steps:
                rate = (step - done_at_start) / max(time.perf_counter() - t0, 1e-9)
                lines = _log_lines(members, params, td, x, x_next, td.dr3_pairs[idx],
                                   phi.detach(), loss_sum / steps_since, step, rate)
                loss_sum.zero_()
                steps_since = 0
                for m in members:
                    history[m.name].append(lines[m.name])
                last = lines
                if out_path is not None:
                    for m in members:
                        with open(out_path / MEMBERS_DIR / f"{m.name}.jsonl", "a") as f:
                            f.write(json.dumps(lines[m.name]) + "\n")
                if on_log is not None:
                    on_log(step, lines)
                bar.set_postfix_str(_postfix(members, lines))
                if out_path is not None and (step % settings.checkpoint_every == 0
                                             or step == settings.steps):
                    _save(out_path / CHECKPOINT_FILE, step, params, target, optimizer,
                          batch_gens, action_gens)
                    _write_summary(out_path, members, lines, rate, step, settings.steps)
    finally:
        bar.close()
    rate = (settings.steps - done_at_start) / max(time.perf_counter() - t0, 1e-9)
    return OfflineResult(members, [p.detach() for p in params], last, rate, out_path, history)


@torch.no_grad()
def _log_lines(members: Sequence[Member], params: Params, td: TrainingData, x: torch.Tensor,
               x_next: torch.Tensor, pairs: torch.Tensor, phi: torch.Tensor,
               td_loss: torch.Tensor, step: int, rate: float) -> dict[str, dict[str, Any]]:
    """One log line per member (module doc); ``pairs``: ``(M, B)``, the minibatch's pairs
    of the DR3 term, which ``feature_dot`` and ``feature_cosine`` average over."""
    _, phi_next = q_forward(params, x_next)
    M = len(members)
    weight = pairs.to(phi.dtype)
    count = weight.sum(-1)
    dots = (feature_dot(phi, phi_next) * weight).sum(-1) / count
    cosines = (feature_cosine(phi, phi_next) * weight).sum(-1) / count
    norms = feature_norm(phi).mean(-1)
    phi_eval = q_forward(params, td.srank_x.expand(M, *td.srank_x.shape))[1]
    q_ref, _ = q_forward(params, td.ref_x.expand(M, *td.ref_x.shape))
    scale = td.ref_q.abs().mean().clamp_min(1e-12)
    abs_err = (q_ref - td.ref_q).abs().mean(-1) / scale
    signed = (q_ref - td.ref_q).mean(-1) / scale
    q_mean = q_forward(params, td.q_mean_x.expand(M, *td.q_mean_x.shape))[0].mean(-1)
    lines = {}
    for i, m in enumerate(members):
        lines[m.name] = {
            "step": step, "variant": m.variant.name, "seed": m.seed,
            "td_loss": float(td_loss[i]), "feature_dot": float(dots[i]),
            "feature_cosine": float(cosines[i]), "feature_norm": float(norms[i]),
            "feature_srank": srank(phi_eval[i]), "feature_srank_rows": len(td.srank_x),
            "q_abs_error": float(abs_err[i]),
            "q_signed_error": float(signed[i]), "q_mean": float(q_mean[i]),
            "steps_per_s": rate,
        }
    return lines


def _postfix(members: Sequence[Member], lines: dict[str, dict[str, Any]]) -> str:
    by_variant: dict[str, list[float]] = {}
    for m in members:
        by_variant.setdefault(m.variant.name, []).append(lines[m.name]["feature_dot"])
    return " ".join(f"{k} dot {np.mean(v):.3g}" for k, v in by_variant.items())


def _rewrite(path: Path, lines: list[dict[str, Any]]) -> None:
    from pgscope.run import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in lines).encode())


def _save(path: Path, step: int, params: Params, target: Params,
          optimizer: torch.optim.Optimizer, batch_gens: list[torch.Generator],
          action_gens: list[torch.Generator]) -> None:
    from pgscope.run import atomic_write_bytes

    payload = {"format": FORMAT, "step": step, "params": [p.detach() for p in params],
               "target": target, "optimizer": optimizer.state_dict(),
               "batch_generators": [g.get_state() for g in batch_gens],
               "action_generators": [g.get_state() for g in action_gens]}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _restore(path: Path, params: Params, target: Params, optimizer: torch.optim.Optimizer,
             batch_gens: list[torch.Generator], action_gens: list[torch.Generator]) -> int:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise OfflineError(f"checkpoint '{path}' is corrupt or unsafe ({type(exc).__name__}); "
                           "delete it to restart the experiment.") from None
    if [tuple(p.shape) for p in ckpt["params"]] != [tuple(p.shape) for p in params]:
        raise OfflineError(f"checkpoint '{path}' does not fit this experiment's members.")
    with torch.no_grad():
        for p, saved in zip(params, ckpt["params"], strict=True):
            p.copy_(saved)
        for p, saved in zip(target, ckpt["target"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(ckpt["optimizer"])
    for g, state in zip(batch_gens, ckpt["batch_generators"], strict=True):
        g.set_state(state)
    for g, state in zip(action_gens, ckpt["action_generators"], strict=True):
        g.set_state(state)
    return int(ckpt["step"])


def _write_summary(out: Path, members: Sequence[Member], lines: dict[str, dict[str, Any]],
                   rate: float, step: int, steps: int) -> None:
    from pgscope.run import atomic_write_json

    atomic_write_json(out / SUMMARY_FILE, {
        "step": step, "steps": steps, "complete": step >= steps, "steps_per_s": rate,
        "members": {m.name: lines[m.name] for m in members}})
