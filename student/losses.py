"""Student losses (DESIGN.md section 5): ITC, CPRD and the distillation baselines.

Pure functions of tensors: no model, no I/O. Each docstring opens with its formula.
Shape letters: I images and T captions of a batch (ITC); Q queries, K candidates per query
(CPRD: K hard negatives; baselines: 1 + K columns, the positive in column 0).
Convention shared by every ranking loss: candidates are ordered by teacher score, highest first,
ties broken by column index (a stable sort), so the same inputs always give the same loss;
``mask`` marks real candidates and padding (False) is excluded everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DISTILL_LOSSES",
    "LOSS_NAMES",
    "combine",
    "cprd_loss",
    "itc_loss",
    "kl_loss",
    "listmle_loss",
    "margin_mse_loss",
    "num_valid_from_rule",
]

_NEG_INF = float("-inf")


def _check_scalar(name: str, value: float | Tensor) -> None:
    """Raise ValueError unless value is a number > 0 or a one-element tensor (sign not checked)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar; got a tensor of shape "
                f"{tuple(value.shape)}: pass a 0-d tensor or a float"
            )
    elif not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def _check_lists(student_sim: Tensor, teacher_score: Tensor, mask: Tensor | None) -> Tensor:
    """Validate a (Q, K) pair of score lists and return the mask (all True when None)."""
    if student_sim.dim() != 2 or student_sim.shape != teacher_score.shape:
        raise ValueError(
            "student_sim and teacher_score must both be 2-D with the same shape (queries, "
            f"candidates); got {tuple(student_sim.shape)} and {tuple(teacher_score.shape)}: "
            "pass one row per query and one column per candidate"
        )
    if mask is None:
        return torch.ones_like(student_sim, dtype=torch.bool)
    if mask.dtype != torch.bool or mask.shape != student_sim.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(student_sim.shape)}; got {mask.dtype} "
            f"{tuple(mask.shape)}: pass True for real candidates and False for padding"
        )
    return mask


def _check_positive_column(mask: Tensor) -> None:
    """Baselines read the positive from column 0, which must exist and be real in every row."""
    if mask.shape[1] == 0 or not bool(mask[:, 0].all()):
        raise ValueError(
            "column 0 must hold each query's positive and be real (mask[:, 0] all True): "
            "put the positive first and the K hard negatives after it"
        )


def _teacher_order(
    student_sim: Tensor, teacher_score: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Return (student_sim, mask) reordered per row: real by teacher score desc, then padding."""
    # Two stable sorts: by teacher score (ties keep column order), then real before padding;
    # a -inf fill would tie a real -inf teacher score with padding.
    order = torch.sort(teacher_score, dim=1, descending=True, stable=True).indices  # (Q, K)
    real_first = torch.sort(
        mask.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True
    ).indices  # (Q, K)
    order = order.gather(1, real_first)  # (Q, K)
    return student_sim.gather(1, order), mask.gather(1, order)


def _suffix_terms(logits: Tensor, mask: Tensor) -> Tensor:
    """Return logsumexp_{k>=j}(logits_k) - logits_j per position over real entries; 0 at padding."""
    masked = logits.masked_fill(~mask, _NEG_INF)  # (Q, K)
    # Reverse cumulative logsumexp: the suffix k >= j; padding adds exp(-inf) = 0.
    suffix = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)  # (Q, K)
    return torch.where(mask, suffix - masked, torch.zeros_like(logits))  # (Q, K)


def itc_loss(
    sim: Tensor,
    logit_scale: float | Tensor,
    positive: Tensor | None = None,
    *,
    anchors: int | None = None,
) -> Tensor:
    """L = 1/2 [mean_i (lse_t l_it - lse_{t in P(i)} l_it) + mean_t (lse_i - lse_{i in P(t)})].

    The text->image half uses the same l_it, with images and captions swapped. l = logit_scale *
    sim, logit_scale = 1/tau already exponentiated (as open_clip's forward returns it), sim (I, T)
    cosine similarities. Multi-positive InfoNCE: each image row's term is
    -log(sum_{pos} exp(l) / sum_all exp(l)), so several captions of one image in the batch are all
    positives for it, never negatives; caption columns likewise over images. With one positive
    per row and column it is CLIP's symmetric cross-entropy. ``positive`` (I, T) bool; None means
    the identity (sim square, caption t belongs to image t). A row or column with no positive (a
    negative-only image or caption) is not an anchor but still serves as a negative for the other
    direction; ValueError when a direction has no anchor at all. ``anchors`` = A makes only the
    first A rows and first A columns anchors (the step's pairs); later rows and columns are extra
    items that serve as negatives (or as further positives of an anchor they belong to).
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D (images, captions); got shape {tuple(sim.shape)}")
    _check_scalar("logit_scale", logit_scale)
    if positive is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(
                f"sim is {tuple(sim.shape)}, not square: pass `positive`, an "
                "(images, captions) bool mask of matching pairs"
            )
        positive = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if positive.dtype != torch.bool or positive.shape != sim.shape:
        raise ValueError(
            f"positive must be a bool tensor of shape {tuple(sim.shape)}; got "
            f"{positive.dtype} {tuple(positive.shape)}: True where caption t "
            "describes image i"
        )
    if anchors is not None and not 1 <= anchors <= min(sim.shape):
        raise ValueError(
            f"anchors must lie in 1..{min(sim.shape)} (the pairs come first); got {anchors}"
        )
    logits = logit_scale * sim  # (I, T)
    losses = []
    for lg, pos in ((logits, positive), (logits.t(), positive.t())):  # image->text, text->image
        anchor = pos.any(dim=1)  # (rows,)
        if anchors is not None:
            anchor = anchor & (torch.arange(len(anchor), device=anchor.device) < anchors)
        if not bool(anchor.any()):
            raise ValueError(
                "positive has no True entry: every image needs at least one of its "
                "captions in the batch"
            )
        # Rows without a positive keep all logits, so their (excluded) term is 0, not inf.
        pos_lg = lg.masked_fill(~pos & anchor[:, None], _NEG_INF)  # (rows, cols)
        row = torch.logsumexp(lg, dim=1) - torch.logsumexp(pos_lg, dim=1)  # (rows,)
        losses.append(row[anchor].mean())
    return (losses[0] + losses[1]) / 2


def cprd_loss(
    student_sim: Tensor,
    teacher_score: Tensor,
    num_valid: Tensor,
    tau: float | Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """L(q) = (1/J) sum_{j=1..J} [lse_{k=j..K}(s_k/tau) - s_j/tau], mean over queries with J > 0.

    s (Q, K) student cosine similarities to the query's hard negatives (positives NOT included),
    ordered by ``teacher_score`` (Q, K), highest first; this function sorts, ties broken by
    column index (stable). J = min(num_valid[q], number of real candidates of q). Padding
    (``mask`` False) is never an anchor and never in a logsumexp, and its values (NaN included)
    change neither the loss nor any gradient. Queries with J = 0 contribute nothing; if none has
    J > 0 the result is a zero still connected to ``student_sim``, so backward works. ``tau`` is
    the student's temperature (1 / logit_scale), a float or a scalar tensor.
    """
    mask = _check_lists(student_sim, teacher_score, mask)
    _check_scalar("tau", tau)
    if (
        num_valid.shape != student_sim.shape[:1]
        or num_valid.is_floating_point()
        or num_valid.dtype == torch.bool
    ):
        raise ValueError(
            f"num_valid must be an integer tensor of shape ({student_sim.shape[0]},),"
            f" one count per query; got {num_valid.dtype} {tuple(num_valid.shape)}: "
            "build it with num_valid_from_rule"
        )
    if bool((num_valid < 0).any()):
        raise ValueError("num_valid must be >= 0 for every query; got a negative count")
    s, m = _teacher_order(student_sim, teacher_score, mask)  # (Q, K) each, real first
    n_real = m.sum(dim=1)  # (Q,)
    j = torch.minimum(num_valid.to(n_real), n_real)  # (Q,)
    anchor = torch.arange(s.shape[1], device=s.device)[None, :] < j[:, None]  # (Q, K)
    terms = _suffix_terms(s / tau, m)  # (Q, K)
    per_query = (terms * anchor).sum(dim=1) / j.clamp(min=1)  # (Q,); 0 where J = 0
    return per_query.sum() / (j > 0).sum().clamp(min=1)


def num_valid_from_rule(
    teacher_prob: Tensor,
    mask: Tensor | None = None,
    *,
    top: int | None = None,
    min_prob: float | None = None,
) -> Tensor:
    """J[q] = min(top, n_real[q]), or J[q] = #{real k : teacher_prob[q, k] >= min_prob}; (Q,) long.

    The validity rule of DESIGN 5 (``--valid-top`` / ``--valid-min-prob``); exactly one of
    ``top`` and ``min_prob`` must be given. ``teacher_prob`` (Q, K) is the teacher's match
    probability of each hard negative; it must be a monotone function of the score that
    ``cprd_loss`` sorts by (e.g. the ITM softmax of the cached logit), so the negatives above the
    threshold are exactly the first J in teacher order. Padding (``mask`` False) never counts.
    """
    if (top is None) == (min_prob is None):
        raise ValueError(
            "give exactly one validity rule: top (a fixed count, --valid-top) or "
            "min_prob (a teacher probability threshold, --valid-min-prob)"
        )
    if teacher_prob.dim() != 2:
        raise ValueError(
            f"teacher_prob must be 2-D (queries, candidates); got shape {tuple(teacher_prob.shape)}"
        )
    mask = _check_lists(teacher_prob, teacher_prob, mask)
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be an integer >= 0; got {top!r}")
        return mask.sum(dim=1).clamp(max=top).long()  # (Q,)
    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be a probability in [0, 1]; got {min_prob!r}")
    return ((teacher_prob >= min_prob) & mask).sum(dim=1).long()  # (Q,)


def kl_loss(
    student_sim: Tensor,
    teacher_score: Tensor,
    tau: float | Tensor,
    tau_teacher: float | Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """L(q) = sum_k p_k (log p_k - log r_k), p = softmax(t/tau_teacher), r = softmax(s/tau); mean_q.

    Plain logit distillation (LoopITR-style) over the positive (column 0, must be real) plus the
    K hard negatives; both softmaxes run over real entries only. Inputs (Q, 1 + K).
    """
    mask = _check_lists(student_sim, teacher_score, mask)
    _check_scalar("tau", tau)
    _check_scalar("tau_teacher", tau_teacher)
    _check_positive_column(mask)
    log_p = torch.log_softmax((teacher_score / tau_teacher).masked_fill(~mask, _NEG_INF), 1)
    log_r = torch.log_softmax((student_sim / tau).masked_fill(~mask, _NEG_INF), 1)  # (Q, 1+K)
    kl = torch.where(mask, log_p.exp() * (log_p - log_r), torch.zeros_like(log_r))  # (Q, 1+K)
    return kl.sum(dim=1).mean()


def listmle_loss(
    student_sim: Tensor, teacher_score: Tensor, tau: float | Tensor, mask: Tensor | None = None
) -> Tensor:
    """L(q) = (1/n) sum_{i=1..n} [lse_{k=i..n}(s_k/tau) - s_i/tau] in teacher order; mean over q.

    Plackett-Luce negative log-likelihood of the teacher's complete order of the positive
    (column 0, must be real) plus ALL K hard negatives: no validity cut, which is what separates it
    from CPRD. The positive takes its place by its teacher score, it is not forced first. n = real
    entries of the query; normalised by n (mean over positions, the trivial last one included), so
    it equals ``cprd_loss`` on the same (Q, 1 + K) lists with J = n. Ties: stable, as cprd_loss.
    """
    mask = _check_lists(student_sim, teacher_score, mask)
    _check_scalar("tau", tau)
    _check_positive_column(mask)
    s, m = _teacher_order(student_sim, teacher_score, mask)  # (Q, 1+K) each
    terms = _suffix_terms(s / tau, m)  # (Q, 1+K)
    return (terms.sum(dim=1) / m.sum(dim=1)).mean()


def margin_mse_loss(
    student_sim: Tensor,
    teacher_score: Tensor,
    mask: Tensor | None = None,
    *,
    student_scale: float | Tensor = 1.0,
) -> Tensor:
    """L = mean_{(q,k) real} [ c (s_q0 - s_qk) - (t_q0 - t_qk) ]^2, c = student_scale.

    sentence-transformers' MarginMSELoss over every real hard negative k >= 1 against the positive
    in column 0 (must be real); inputs (Q, 1 + K). Student cosines live in [-1, 1] while teacher
    scores are raw ITM logits, so pass ``student_scale`` (e.g. the student's logit_scale) to put the
    student margins in logit units; a tensor scale receives gradient unless detached. Mean over all
    real (query, negative) pairs, so a query weighs by its number of negatives; no real negative
    at all gives a zero still connected to ``student_sim``.
    """
    mask = _check_lists(student_sim, teacher_score, mask)
    _check_scalar("student_scale", student_scale)
    _check_positive_column(mask)
    s_margin = student_scale * (student_sim[:, :1] - student_sim[:, 1:])  # (Q, K)
    t_margin = teacher_score[:, :1] - teacher_score[:, 1:]  # (Q, K)
    valid = mask[:, 1:]  # (Q, K)
    sq = torch.where(valid, (s_margin - t_margin) ** 2, torch.zeros_like(s_margin))  # (Q, K)
    return sq.sum() / valid.sum().clamp(min=1)


def combine(itc: Tensor, distill: Tensor | None, lam: float) -> dict[str, Tensor]:
    """Return {"itc", "distill", "total" = itc + lam * distill}; no "distill" key when it is None.

    The trainer backpropagates "total" and logs every term.
    """
    if lam < 0:
        raise ValueError(f"lam (the distillation weight) must be >= 0; got {lam}")
    for name, term in (("itc", itc), ("distill", distill)):
        if term is not None and term.dim() != 0:
            raise ValueError(f"{name} must be a scalar loss; got shape {tuple(term.shape)}")
    if distill is None:
        return {"itc": itc, "total": itc}
    return {"itc": itc, "distill": distill, "total": itc + lam * distill}


# Distillation terms by their `--distill` name; the signatures differ (see each docstring), and
# "none" trains with ITC only.
DISTILL_LOSSES: dict[str, Callable[..., Tensor] | None] = {
    "cprd": cprd_loss,
    "kl": kl_loss,
    "listmle": listmle_loss,
    "margin-mse": margin_mse_loss,
    "none": None,
}
LOSS_NAMES: tuple[str, ...] = tuple(DISTILL_LOSSES)
