"""The loss of one training step: ITC over the batch's pairs plus a distillation term over each
query's cached hard negatives that the step holds (DESIGN 5).

Shape letters: B pairs, Pi / Pc images / captions of the step's pools (the pairs first, then the
extras: the queries' cached hard negatives, encoded or read from the negative bank), K hard
negatives per query. ``sim`` (Pi, Pc) holds cosine similarities; pair r is (image r, caption r).
ITC anchors on the B pairs; with ``positive`` (Pi, Pc) given (``--itc-negatives pool``) every
extra is a negative in its denominators too (an extra that belongs to an anchor is a positive),
otherwise ITC runs on sim[:B, :B] and the extras serve only the distillation term.

Distillation, per direction (image queries over captions, caption queries over images):
- ``cprd``: the query's in-step hard negatives in teacher order, J valid anchors by the rule;
- ``kl`` / ``listmle`` / ``margin-mse``: the positive pair (column 0) plus the same negatives;
  margin-mse puts student margins in logit units with the detached logit_scale.
  A query whose positive pair was never scored by the teacher (not in the cache), or that has no
  in-step negative, is left out of these terms (no invented score).
The directions present are averaged; a step where neither has a term gives a zero that is still
connected to the graph, so the same code path runs every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from student.losses import (
    combine,
    cprd_loss,
    itc_loss,
    kl_loss,
    listmle_loss,
    margin_mse_loss,
    num_valid_from_rule,
)
from student.sampler import QueryLists

_EXCLUDED = -1e4  # a cosine no entry reaches: exp(scale * -1e4) is 0 for any logit_scale >= 1


@dataclass(frozen=True)
class DistillSettings:
    """The loss options of StudentTrainConfig that a step needs."""

    loss: str  # cprd | kl | listmle | margin-mse | none
    lam: float  # total = itc + lam * distill
    tau: float | None  # None: the student's 1 / logit_scale, detached
    tau_teacher: float  # kl: teacher softmax temperature
    valid_top: int | None  # cprd validity rule: a fixed count ...
    valid_min_prob: float | None  # ... or a teacher-probability threshold (exactly one is set)
    itc_negatives: str = "batch"  # given ``positive``: pool (every extra) or own (each anchor's
    # own delivered negatives only) in ITC's denominators


def step_loss(
    sim: Tensor,
    logit_scale: Tensor,
    num_pairs: int,
    lists: tuple[QueryLists, QueryLists] | None,
    pos_score: np.ndarray | None,
    st: DistillSettings,
    positive: Tensor | None = None,
) -> dict[str, Tensor]:
    """{"itc", "distill" (unless loss is none), "total"} for one step (module docstring)."""
    b = num_pairs
    if positive is None or st.itc_negatives == "batch":
        itc = itc_loss(sim[:b, :b], logit_scale)
    elif st.itc_negatives == "own":
        allowed = _own(sim.shape, b, lists).to(sim.device)
        # A finite fill, not -inf: a row with no allowed entry would give NaN gradients.
        excluded = sim.masked_fill(~allowed, _EXCLUDED)
        itc = itc_loss(excluded, logit_scale, positive & allowed, anchors=b)
    else:
        itc = itc_loss(sim, logit_scale, positive, anchors=b)
    if st.loss == "none":
        return combine(itc, None, st.lam)
    # A detached tau: the distillation term must not move the temperature ITC learns.
    tau = st.tau if st.tau is not None else (1.0 / logit_scale).detach()
    pos_sim = sim[:b, :b].diagonal()  # (B,)
    per_dir = []
    for student, ql in (
        (sim[:b], lists[0]),  # image queries: rows over the caption pool
        (sim[:, :b].t(), lists[1]),  # caption queries: rows over the image pool
    ):
        idx = torch.from_numpy(ql.index).to(sim.device)  # (B, K)
        s = student.gather(1, idx)  # (B, K)
        term = _direction(s, ql, pos_sim, pos_score, tau, logit_scale.detach(), st)
        if term is not None:
            per_dir.append(term)
    distill = torch.stack(per_dir).mean() if per_dir else (sim * 0).sum()
    return combine(itc, distill, st.lam)


def _direction(
    s: Tensor,
    ql: QueryLists,
    pos_sim: Tensor,
    pos_score: np.ndarray | None,
    tau: float | Tensor,
    scale: Tensor,
    st: DistillSettings,
) -> Tensor | None:
    """One direction's distillation term, or None when no query of the step qualifies."""
    dev = s.device
    t = torch.from_numpy(ql.score).to(dev)  # (B, K)
    m = torch.from_numpy(ql.mask).to(dev)  # (B, K)
    if st.loss == "cprd":
        j = num_valid_from_rule(
            torch.from_numpy(ql.prob).to(dev), m, top=st.valid_top, min_prob=st.valid_min_prob
        )  # (B,)
        return cprd_loss(s, t, j, tau, m) if bool((j > 0).any()) else None
    keep = np.isfinite(pos_score) & ql.mask.any(axis=1)  # (B,)
    if not keep.any():
        return None
    keep_t = torch.from_numpy(keep).to(dev)
    pos_t = torch.from_numpy(np.nan_to_num(pos_score)).to(dev)  # (B,)
    s1 = torch.cat([pos_sim[:, None], s], dim=1)[keep_t]  # (Q, 1 + K)
    t1 = torch.cat([pos_t[:, None], t], dim=1)[keep_t]  # (Q, 1 + K)
    m1 = torch.cat([torch.ones_like(m[:, :1]), m], dim=1)[keep_t]  # (Q, 1 + K)
    if st.loss == "kl":
        return kl_loss(s1, t1, tau, st.tau_teacher, m1)
    if st.loss == "listmle":
        return listmle_loss(s1, t1, tau, m1)
    if st.loss == "margin-mse":
        return margin_mse_loss(s1, t1, m1, student_scale=scale)
    raise ValueError(f"unknown distillation loss {st.loss!r}")


def _own(shape: tuple[int, int], b: int, lists: tuple[QueryLists, QueryLists]) -> Tensor:
    """(Pi, Pc) bool: the entries ITC may use when each anchor sees the batch plus only its own
    delivered negatives: the pairs' block, image anchor r's listed captions (row r), caption
    anchor c's listed images (column c). Extra-extra entries serve no anchor."""
    allowed = torch.zeros(shape, dtype=torch.bool)
    allowed[:b, :b] = True
    for ql, transpose in ((lists[0], False), (lists[1], True)):
        rows = np.repeat(np.arange(len(ql.index)), ql.mask.sum(axis=1))
        cols = ql.index[ql.mask]
        if transpose:
            allowed[torch.from_numpy(cols), torch.from_numpy(rows)] = True
        else:
            allowed[torch.from_numpy(rows), torch.from_numpy(cols)] = True
    return allowed


def pool_positive(image_pool: np.ndarray, caption_pool: np.ndarray, owner: np.ndarray) -> Tensor:
    """(Pi, Pc) bool: caption c of the pool describes image i of the pool (``owner`` (M,) is every
    caption's image id)."""
    return torch.from_numpy(owner[caption_pool][None, :] == image_pool[:, None])


class Delivery:
    """What the distillation inputs actually held, summed over steps (DESIGN 5: "a default that
    uses fewer than about 0.9 K is a bug"), per direction: queries, negatives used (in the loss)
    and available (cached, up to hard_k), the smallest per-query share used, and queries left out
    of a positive-column loss (kl, listmle, margin-mse) because the teacher never scored their
    positive pair. Plain numbers only, so it rides in the checkpoint."""

    DIRECTIONS = ("i2t", "t2i")

    def __init__(self, state: dict | None = None):
        blank = {"queries": 0, "used": 0, "available": 0, "min_share": 1.0, "no_positive": 0}
        self.state = state or {d: dict(blank) for d in self.DIRECTIONS}

    def add(self, lists: tuple[QueryLists, QueryLists], pos_score: np.ndarray) -> None:
        """Count one step's lists (image queries, caption queries) and positive scores (B,)."""
        no_pos = int((~np.isfinite(pos_score)).sum())
        for d, ql in zip(self.DIRECTIONS, lists, strict=True):
            used, avail = ql.present, ql.cached
            acc = self.state[d]
            acc["queries"] += len(used)
            acc["used"] += int(used.sum())
            acc["available"] += int(avail.sum())
            has = avail > 0
            if has.any():
                share = float((used[has] / avail[has]).min())
                acc["min_share"] = min(acc["min_share"], share)
            acc["no_positive"] += no_pos

    def merged(self, other: Delivery) -> Delivery:
        """The sum of two runs' counts (an epoch added to a run)."""
        out = {}
        for d in self.DIRECTIONS:
            a, b = self.state[d], other.state[d]
            out[d] = {k: a[k] + b[k] for k in ("queries", "used", "available", "no_positive")}
            out[d]["min_share"] = min(a["min_share"], b["min_share"])
        return Delivery(out)

    def summary(self) -> dict | None:
        """{"i2t": {"used": mean, "available": mean, "min_share", "no_positive"}, "t2i": ...},
        or None before any query was counted."""
        if not self.state["i2t"]["queries"]:
            return None
        out = {}
        for d in self.DIRECTIONS:
            a = self.state[d]
            out[d] = {
                "used": a["used"] / a["queries"],
                "available": a["available"] / a["queries"],
                "min_share": a["min_share"],
                "no_positive": a["no_positive"],
            }
        return out
