"""Student losses: each vectorised loss against its formula written out with Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student.losses import (
    DISTILL_LOSSES,
    LOSS_NAMES,
    combine,
    cprd_loss,
    itc_loss,
    kl_loss,
    listmle_loss,
    margin_mse_loss,
    num_valid_from_rule,
)

SEEDS = [0, 1, 2, 3, 4]


def lse(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def teacher_order(t: list[float], real: list[bool]) -> list[int]:
    """Real columns by teacher score, highest first, ties by column index (the documented rule)."""
    return sorted((k for k in range(len(t)) if real[k]), key=lambda k: (-t[k], k))


def naive_cprd(s, t, num_valid, tau, mask) -> float:
    per_query = []
    for q in range(len(s)):
        order = teacher_order(t[q], mask[q])
        j_max = min(num_valid[q], len(order))
        if j_max == 0:
            continue
        total = 0.0
        for j in range(j_max):
            total += (
                lse([s[q][order[k]] / tau for k in range(j, len(order))]) - s[q][order[j]] / tau
            )
        per_query.append(total / j_max)
    return sum(per_query) / len(per_query) if per_query else 0.0


def naive_itc(sim, scale, positive) -> float:
    n_img, n_txt = len(sim), len(sim[0])
    rows, cols = [], []
    for i in range(n_img):
        pos = [scale * sim[i][c] for c in range(n_txt) if positive[i][c]]
        if pos:
            rows.append(lse([scale * sim[i][c] for c in range(n_txt)]) - lse(pos))
    for c in range(n_txt):
        pos = [scale * sim[i][c] for i in range(n_img) if positive[i][c]]
        if pos:
            cols.append(lse([scale * sim[i][c] for i in range(n_img)]) - lse(pos))
    return (sum(rows) / len(rows) + sum(cols) / len(cols)) / 2


def naive_kl(s, t, tau, tau_t, mask) -> float:
    out = []
    for q in range(len(s)):
        ks = [k for k in range(len(s[q])) if mask[q][k]]
        zt, zs = lse([t[q][k] / tau_t for k in ks]), lse([s[q][k] / tau for k in ks])
        out.append(
            sum(
                math.exp(t[q][k] / tau_t - zt) * ((t[q][k] / tau_t - zt) - (s[q][k] / tau - zs))
                for k in ks
            )
        )
    return sum(out) / len(out)


def naive_listmle(s, t, tau, mask) -> float:
    out = []
    for q in range(len(s)):
        order = teacher_order(t[q], mask[q])
        n = len(order)
        out.append(
            sum(
                lse([s[q][order[k]] / tau for k in range(i, n)]) - s[q][order[i]] / tau
                for i in range(n)
            )
            / n
        )
    return sum(out) / len(out)


def naive_margin_mse(s, t, mask, scale) -> float:
    errs = []
    for q in range(len(s)):
        for k in range(1, len(s[q])):
            if mask[q][k]:
                errs.append((scale * (s[q][0] - s[q][k]) - (t[q][0] - t[q][k])) ** 2)
    return sum(errs) / len(errs)


def random_lists(seed: int, q: int = 6, k: int = 7, ties: bool = True, positive_col: bool = False):
    """Student cosines, teacher logits (small integers when ties), padding mask, counts."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(q, k, generator=g, dtype=torch.float64) * 2 - 1
    if ties:
        t = torch.randint(-2, 3, (q, k), generator=g).double()
    else:
        t = torch.randn(q, k, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(q, k, generator=g) > 0.3
    mask[0] = True  # one query without padding
    if q > 1:
        mask[1] = False  # one query with no real candidate at all
    if positive_col:
        mask[:, 0] = True
    num_valid = torch.randint(0, k + 2, (q,), generator=g)
    return s, t, mask, num_valid


# ---- CPRD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_cprd_matches_naive_formula(seed, tau):
    """cprd_loss equals DESIGN 5's formula looped per query and anchor, with padding and ties."""
    s, t, mask, nv = random_lists(seed)
    got = cprd_loss(s, t, nv, tau, mask)
    want = naive_cprd(s.tolist(), t.tolist(), nv.tolist(), tau, mask.tolist())
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def test_cprd_tensor_tau_and_float32():
    """A 0-d tensor tau and float32 inputs give the same value as a float tau in float64."""
    s, t, mask, nv = random_lists(7)
    want = cprd_loss(s, t, nv, 0.1, mask)
    got = cprd_loss(s.float(), t.float(), nv, torch.tensor(0.1), mask)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_cprd_ties_break_by_column_index():
    """Equal teacher scores keep column order: the earlier column is the anchor."""
    s = torch.tensor([[0.9, 0.1]])
    t = torch.tensor([[1.0, 1.0]])
    got = cprd_loss(s, t, torch.tensor([1]), 1.0)
    assert torch.allclose(got, torch.logsumexp(s[0], 0) - s[0, 0])
    got_swapped = cprd_loss(s.flip(1), t, torch.tensor([1]), 1.0)
    assert torch.allclose(got_swapped, torch.logsumexp(s[0], 0) - s[0, 1])


def test_cprd_zero_j_queries_contribute_nothing():
    """Appending a query with J = 0 (count 0, or no real candidate) leaves the loss unchanged."""
    s, t, mask, _ = random_lists(3, ties=False)
    mask[1] = True
    nv = torch.full((s.shape[0],), 3)
    base = cprd_loss(s, t, nv, 0.1, mask)
    extra_s, extra_t = (
        torch.rand(2, s.shape[1], dtype=torch.float64),
        torch.randn(2, s.shape[1], dtype=torch.float64),
    )
    extra_mask = torch.tensor([[True] * s.shape[1], [False] * s.shape[1]])
    got = cprd_loss(
        torch.cat([s, extra_s]),
        torch.cat([t, extra_t]),
        torch.cat([nv, torch.tensor([0, 5])]),
        0.1,
        torch.cat([mask, extra_mask]),
    )
    assert torch.allclose(got, base)


def test_cprd_all_zero_j_is_zero_with_gradient():
    """All queries J = 0 gives 0 connected to student_sim; backward yields finite zero grads."""
    s = torch.rand(3, 4, requires_grad=True)
    loss = cprd_loss(s, torch.randn(3, 4), torch.zeros(3, dtype=torch.long), 0.1)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(3, 4))


def test_cprd_padding_changes_nothing():
    """Values at padded positions (student, teacher, even NaN) change neither loss nor gradient."""
    s, t, mask, nv = random_lists(5)
    losses, grads = [], []
    for fill in (None, 1e3, float("nan")):
        s2, t2 = s.clone(), t.clone()
        if fill is not None:
            s2[~mask], t2[~mask] = fill, fill
        s2.requires_grad_(True)
        loss = cprd_loss(s2, t2, nv, 0.1, mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(s2.grad)
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert torch.equal(loss, losses[0])
        assert torch.isfinite(grad).all() and torch.equal(grad, grads[0])
    assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_cprd_column_permutation_invariant(seed):
    """Permuting candidate columns (teacher scores and mask with them) leaves the loss unchanged."""
    s, t, mask, nv = random_lists(seed, ties=False)
    perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(seed + 100))
    assert torch.allclose(
        cprd_loss(s, t, nv, 0.1, mask), cprd_loss(s[:, perm], t[:, perm], nv, 0.1, mask[:, perm])
    )


def test_cprd_prefers_teacher_order():
    """A student ranking like the teacher with large margins scores lower than the reverse."""
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    agree = torch.tensor([[0.8, 0.6, 0.4, 0.2, 0.0]])
    nv = torch.tensor([3])
    assert cprd_loss(agree, t, nv, 0.05) < cprd_loss(agree.flip(1), t, nv, 0.05)


def test_cprd_gradcheck():
    """Analytic gradients w.r.t. student_sim and a tensor tau match finite differences (float64)."""
    s, t, mask, nv = random_lists(11, q=3, k=5, ties=False)
    s.requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cprd_loss(a, t, nv, b, mask), (s, tau))


# ---- validity rule ----------------------------------------------------------------------------


def test_num_valid_top_and_min_prob():
    """top caps at the real count; min_prob counts real negatives at or above the threshold."""
    prob = torch.tensor([[0.9, 0.5, 0.2, 0.7], [0.1, 0.3, 0.3, 0.05], [0.6, 0.6, 0.6, 0.6]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    assert num_valid_from_rule(prob, mask, top=2).tolist() == [2, 2, 0]
    assert num_valid_from_rule(prob, mask, top=5).tolist() == [3, 4, 0]
    assert num_valid_from_rule(prob, mask, min_prob=0.5).tolist() == [2, 0, 0]
    assert num_valid_from_rule(prob, min_prob=0.3).tolist() == [3, 2, 4]
    assert num_valid_from_rule(prob, top=0).dtype == torch.long


@pytest.mark.parametrize(
    "kwargs", [{}, {"top": 2, "min_prob": 0.5}, {"top": -1}, {"min_prob": 1.5}]
)
def test_num_valid_rule_errors(kwargs):
    """Neither or both rules, a negative count and a probability outside [0, 1] are refused."""
    with pytest.raises(ValueError, match="exactly one|top must|min_prob must"):
        num_valid_from_rule(torch.rand(2, 3), **kwargs)


def test_num_valid_min_prob_is_prefix_of_teacher_order():
    """With a monotone probability, the min_prob count selects exactly the top-J teacher anchors."""
    s, t, mask, _ = random_lists(4, ties=False)
    prob = torch.sigmoid(t)
    nv = num_valid_from_rule(prob, mask, min_prob=0.5)
    for q in range(t.shape[0]):
        order = teacher_order(t[q].tolist(), mask[q].tolist())
        assert all(prob[q, k] >= 0.5 for k in order[: nv[q]]) and all(
            prob[q, k] < 0.5 for k in order[nv[q] :]
        )


# ---- ITC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_itc_multi_positive_matches_naive(seed):
    """Several captions per image are all positives (never negatives), as the looped formula says."""
    g = torch.Generator().manual_seed(seed)
    caption_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    sim = torch.rand(4, 8, generator=g, dtype=torch.float64) * 2 - 1
    positive = caption_to_image[None, :] == torch.arange(4)[:, None]
    got = itc_loss(sim, torch.tensor(14.0, dtype=torch.float64), positive)
    assert torch.allclose(
        got, torch.tensor(naive_itc(sim.tolist(), 14.0, positive.tolist()), dtype=torch.float64)
    )


def test_itc_negative_only_rows_are_excluded_as_anchors():
    """An image with no caption in the batch is not an anchor but still a negative for captions."""
    sim = torch.rand(3, 2, dtype=torch.float64)
    positive = torch.tensor([[True, False], [False, True], [False, False]])
    got = itc_loss(sim, 10.0, positive)
    assert torch.allclose(
        got, torch.tensor(naive_itc(sim.tolist(), 10.0, positive.tolist()), dtype=torch.float64)
    )
    assert not torch.allclose(got, itc_loss(sim[:2], 10.0, positive[:2]))


def test_itc_equals_clip_cross_entropy_with_one_caption_each():
    """One caption per image: the loss is CLIP's symmetric cross-entropy, and positive=None is eye."""
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(6, 6, generator=g) * 2 - 1
    scale = torch.tensor(100.0)
    logits, labels = scale * sim, torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(itc_loss(sim, scale), clip)
    assert torch.allclose(itc_loss(sim, scale, torch.eye(6, dtype=torch.bool)), clip)


# ---- baselines --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_matches_naive(seed):
    """kl_loss is the looped KL(teacher || student) over real entries, mean over queries."""
    s, t, mask, _ = random_lists(seed, positive_col=True)
    got = kl_loss(s, t, 0.05, 2.0, mask)
    assert torch.allclose(
        got,
        torch.tensor(
            naive_kl(s.tolist(), t.tolist(), 0.05, 2.0, mask.tolist()), dtype=torch.float64
        ),
    )


def test_kl_zero_for_same_distribution_positive_otherwise():
    """KL vanishes when s/tau equals t/tau_t (up to a shift per query) and is positive otherwise."""
    s, t, mask, _ = random_lists(2, positive_col=True)
    same = t / 2.0 * 0.05 + 0.3
    assert torch.allclose(
        kl_loss(same, t, 0.05, 2.0, mask), torch.tensor(0.0, dtype=torch.float64), atol=1e-10
    )
    assert kl_loss(s, t, 0.05, 2.0, mask) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_listmle_matches_naive_and_cprd_with_full_j(seed):
    """listmle_loss is the looped Plackett-Luce NLL (mean over positions) and cprd with J = n."""
    s, t, mask, _ = random_lists(seed, positive_col=True)
    got = listmle_loss(s, t, 0.1, mask)
    assert torch.allclose(
        got,
        torch.tensor(
            naive_listmle(s.tolist(), t.tolist(), 0.1, mask.tolist()), dtype=torch.float64
        ),
    )
    full = torch.full((s.shape[0],), s.shape[1])
    assert torch.allclose(got, cprd_loss(s, t, full, 0.1, mask))


@pytest.mark.parametrize("seed", SEEDS)
def test_margin_mse_matches_naive(seed):
    """margin_mse_loss is the looped squared margin error over real negatives, scale applied."""
    s, t, mask, _ = random_lists(seed, positive_col=True)
    got = margin_mse_loss(s, t, mask, student_scale=5.0)
    assert torch.allclose(
        got,
        torch.tensor(
            naive_margin_mse(s.tolist(), t.tolist(), mask.tolist(), 5.0), dtype=torch.float64
        ),
    )


def test_margin_mse_zero_when_margins_match():
    """Student margins times student_scale equal to teacher margins give zero loss."""
    _, t, mask, _ = random_lists(1, positive_col=True)
    scale = torch.tensor(20.0, dtype=torch.float64)
    assert torch.allclose(
        margin_mse_loss(t / 20.0 - 0.5, t, mask, student_scale=scale),
        torch.tensor(0.0, dtype=torch.float64),
    )


def test_margin_mse_no_negative_is_connected_zero():
    """Only positives real: the loss is 0 and backward still works."""
    s = torch.rand(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False]] * 2)
    loss = margin_mse_loss(s, torch.randn(2, 3), mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(2, 3))


# ---- registry and combination -----------------------------------------------------------------


def test_registry_names():
    """The --distill names are cprd, kl, listmle, margin-mse and none (ITC only)."""
    assert LOSS_NAMES == ("cprd", "kl", "listmle", "margin-mse", "none")
    assert DISTILL_LOSSES["none"] is None and DISTILL_LOSSES["cprd"] is cprd_loss


def test_combine_names_terms():
    """combine returns named terms and total = itc + lam * distill; no distill key for none."""
    itc, distill = torch.tensor(2.0), torch.tensor(0.5)
    out = combine(itc, distill, 4.0)
    assert set(out) == {"itc", "distill", "total"} and out["total"].item() == 4.0
    assert combine(itc, None, 4.0) == {"itc": itc, "total": itc}


# ---- argument errors --------------------------------------------------------------------------

Z = torch.zeros


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: cprd_loss(Z(2, 3), Z(2, 4), torch.ones(2, dtype=torch.long), 0.1), "same shape"),
        (lambda: cprd_loss(Z(3), Z(3), torch.ones(1, dtype=torch.long), 0.1), "2-D"),
        (
            lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.ones(3, dtype=torch.long), 0.1),
            "one count per query",
        ),
        (lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.ones(2), 0.1), "integer tensor"),
        (lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.tensor([1, -1]), 0.1), ">= 0"),
        (
            lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.ones(2, dtype=torch.long), 0.0),
            "tau must be > 0",
        ),
        (
            lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.ones(2, dtype=torch.long), Z(2)),
            "tau must be a scalar",
        ),
        (
            lambda: cprd_loss(Z(2, 3), Z(2, 3), torch.ones(2, dtype=torch.long), 0.1, Z(2, 3)),
            "bool tensor",
        ),
        (lambda: itc_loss(Z(2, 3), 10.0), "not square"),
        (lambda: itc_loss(Z(2, 2), 10.0, torch.ones(2, 3, dtype=torch.bool)), "shape (2, 2)"),
        (lambda: itc_loss(Z(2, 2), 10.0, torch.zeros(2, 2, dtype=torch.bool)), "no True entry"),
        (lambda: itc_loss(Z(4), 10.0), "2-D"),
        (
            lambda: kl_loss(Z(2, 3), Z(2, 3), 0.1, 1.0, torch.tensor([[False, True, True]] * 2)),
            "column 0",
        ),
        (lambda: listmle_loss(Z(2, 3), Z(3, 3), 0.1), "same shape"),
        (
            lambda: margin_mse_loss(Z(2, 3), Z(2, 3), student_scale=Z(3)),
            "student_scale must be a scalar",
        ),
        (lambda: combine(Z(2), None, 1.0), "scalar loss"),
        (lambda: combine(Z(()), Z(()), -1.0), "lam"),
    ],
)
def test_argument_errors_say_how_to_fix(call, fragment):
    """Bad shapes, dtypes and values raise ValueError naming the problem and the fix."""
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)


def test_cprd_wide_ties_follow_column_order():
    """Ties on wide lists (where an unstable sort reorders) still rank by column index."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 2000, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (4, 2000), generator=g).double()
    strict = t * 10_000 - torch.arange(2000, dtype=torch.float64)  # same order, no ties
    nv = torch.full((4,), 2000)
    assert torch.allclose(cprd_loss(s, t, nv, 0.1), cprd_loss(s, strict, nv, 0.1))
