"""step_loss (one training step's loss) against per-query loops over the verified loss functions,
the negative bank, and the teacher's scores reaching the gradient under the default settings."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from student.bank import NegativeBank  # noqa: E402
from student.batch_loss import Delivery, DistillSettings, pool_positive, step_loss  # noqa: E402
from student.losses import (  # noqa: E402
    cprd_loss,
    itc_loss,
    kl_loss,
    listmle_loss,
    margin_mse_loss,
    num_valid_from_rule,
)
from student.sampler import BatchPlanner, batch_lists  # noqa: E402
from student.teacher_lookup import build_lookup  # noqa: E402
from student.train_config import StudentTrainConfig  # noqa: E402

N_IMG, CAPS_PER_IMG = 24, 2


def synthetic_lookup(seed: int, hard_k: int, *, score_seed: int | None = None, n_img: int = N_IMG):
    """(lookup, caption owner): every image has 2 captions; each image's pairs with 8 random
    captions and each caption's with 6 random images are 'cached' with random teacher scores
    (``score_seed`` redraws only the scores); every positive pair is cached too."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_img), CAPS_PER_IMG)
    n_cap = len(owner)
    pairs = {(int(owner[c]), c) for c in range(n_cap)}
    for i in range(n_img):
        pairs |= {(i, int(c)) for c in rng.choice(n_cap, 8, replace=False)}
    for c in range(n_cap):
        pairs |= {(int(i), c) for i in rng.choice(n_img, 6, replace=False)}
    img, cap = (np.array(x) for x in zip(*sorted(pairs), strict=True))
    srng = np.random.default_rng(seed if score_seed is None else score_seed)
    score = srng.normal(size=len(img)).astype(np.float32) * 2
    frame = pl.DataFrame(
        {"image_id": img, "caption_id": cap, "score": score, "prob": 1 / (1 + np.exp(-score))}
    ).with_columns(pl.col("prob").cast(pl.Float32))
    return build_lookup(frame, owner, np.arange(n_img), n_img, hard_k), owner


def reference(sim, scale, batch, lookup, owner, st: DistillSettings, itc: str) -> dict:
    """The step's loss written out query by query (module docstring of student/batch_loss)."""
    b = len(batch.images)
    ip, cp = batch.image_pool.tolist(), batch.caption_pool.tolist()
    tau = 1.0 / scale
    # ITC: each pair's image over every pool caption (positives: its own captions), and each
    # pair's caption over every pool image; only the pairs are anchors.
    rows, cols = (sim[:b, :b], sim[:b, :b].t()) if itc == "batch" else (sim, sim.t())
    own = (  # each anchor's own listed negatives, as positions in the other pool
        [{cp.index(c) for c in lookup.i2t.of(q)[0] if c in cp} for q in batch.images],
        [{ip.index(i) for i in lookup.t2i.of(q)[0] if i in ip} for q in batch.captions],
    )
    terms = []
    for d, (lg, is_pos) in enumerate(
        (
            (rows, lambda r, c: owner[cp[c]] == ip[r]),
            (cols, lambda r, c: owner[cp[r]] == ip[c]),
        )
    ):
        per = []
        for r in range(b):
            keep = [c for c in range(len(lg[r])) if itc != "own" or c < b or c in own[d][r]]
            logits = scale * lg[r][keep]
            pos = [k for k, c in enumerate(keep) if is_pos(r, c)]
            per.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[pos], 0))
        terms.append(torch.stack(per).mean())
    out = {"itc": (terms[0] + terms[1]) / 2}
    if st.loss == "none":
        return out
    per_dir = []
    for queries, pool, lists, row_of in (
        (batch.images, cp, lookup.i2t, lambda q: sim[q]),  # image r's row over captions
        (batch.captions, ip, lookup.t2i, lambda q: sim[:, q]),  # caption r's column over images
    ):
        vals = []
        for r, q in enumerate(queries.tolist()):
            cand, t, prob = lookup_list(lists, q)
            keep = [k for k, c in enumerate(cand) if c in pool]
            if not keep:
                continue
            s = row_of(r)[[pool.index(cand[k]) for k in keep]][None]  # (1, n)
            tk = torch.tensor(t[keep])[None]
            if st.loss == "cprd":
                j = num_valid_from_rule(torch.tensor(prob[keep])[None], top=st.valid_top)
                if int(j[0]) > 0:
                    vals.append(cprd_loss(s, tk, j, tau))
                continue
            pos_t = lookup.pos_score[batch.captions[r]]
            s1 = torch.cat([sim[r, r].reshape(1, 1), s], 1)
            t1 = torch.cat([torch.tensor([[pos_t]]), tk], 1)
            if st.loss == "kl":
                vals.append(kl_loss(s1, t1, tau, st.tau_teacher))
            elif st.loss == "listmle":
                vals.append(listmle_loss(s1, t1, tau))
            else:  # margin-mse weighs queries by their negatives: keep sums and counts
                vals.append((margin_mse_loss(s1, t1, student_scale=scale) * len(keep), len(keep)))
        if st.loss == "margin-mse" and vals:
            per_dir.append(sum(v for v, _ in vals) / sum(n for _, n in vals))
        elif vals:
            per_dir.append(torch.stack(vals).mean())
    out["distill"] = torch.stack(per_dir).mean()
    return out


def lookup_list(lists, q):
    cand, score, prob = lists.of(q)
    return cand.tolist(), score, prob


@pytest.mark.parametrize("negatives", ["explicit", "bank", "inbatch"])
@pytest.mark.parametrize("loss", ["cprd", "kl", "listmle", "margin-mse", "none"])
@pytest.mark.parametrize("itc", ["pool", "own", "batch"])
def test_step_loss_matches_per_query_reference(negatives, loss, itc):
    """Both directions, non-square pools (pairs + extras): step_loss equals the written-out loop."""
    lookup, owner = synthetic_lookup(0, hard_k=5)
    planner = BatchPlanner(
        np.arange(N_IMG), owner, 6, lookup=lookup, negatives=negatives, neighbours_per_seed=1
    )
    st = DistillSettings(loss, 1.0, None, 0.5, 2, None, itc)
    checked = 0
    for batch in planner.epoch(0)[:3]:
        pi, pc = len(batch.image_pool), len(batch.caption_pool)
        if negatives != "inbatch":
            assert pi != pc and pi > 6 and pc > 6  # non-square: a swapped direction cannot pass
        sim = torch.rand(pi, pc, dtype=torch.float64, generator=torch.Generator().manual_seed(pi))
        sim = (sim * 2 - 1).requires_grad_()
        scale = torch.tensor(7.0, dtype=torch.float64)
        lists = batch_lists(lookup, batch)
        pos = lookup.pos_score[batch.captions]
        positive = pool_positive(batch.image_pool, batch.caption_pool, owner)
        got = step_loss(
            sim, scale, len(batch.images), lists, pos, st, None if itc == "batch" else positive
        )
        want = reference(sim, 7.0, batch, lookup, owner, st, itc)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v.to(got[k]))
        g_got = torch.autograd.grad(got["total"], sim)[0]
        total = want["itc"] + want.get("distill", 0.0)
        torch.testing.assert_close(g_got, torch.autograd.grad(total, sim)[0])
        checked += 1
    assert checked == 3


def test_itc_anchors_keep_extras_as_negatives_only():
    """anchors=A: extra rows/columns add to the denominators but are never anchors themselves."""
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1
    positive = torch.zeros(5, 7, dtype=torch.bool)
    positive[[0, 1, 2], [0, 1, 2]] = True
    positive[3, 5] = positive[4, 6] = positive[1, 4] = True  # extra-extra pairs; an anchor's extra
    got = itc_loss(sim, 3.0, positive, anchors=3)
    lg = 3.0 * sim
    i2t = [torch.logsumexp(lg[r], 0) - torch.logsumexp(lg[r][positive[r]], 0) for r in range(3)]
    t2i = [
        torch.logsumexp(lg[:, c], 0) - torch.logsumexp(lg[:, c][positive[:, c]], 0)
        for c in range(3)
    ]
    torch.testing.assert_close(got, (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2)
    assert not torch.allclose(got, itc_loss(sim, 3.0, positive))  # the extras would be anchors
    with pytest.raises(ValueError, match="anchors must lie in 1..5"):
        itc_loss(sim, 3.0, positive, anchors=6)


def test_teacher_scores_move_the_cprd_gradient_under_default_settings():
    """With the trainer's default settings, redrawing only the teacher's scores changes the CPRD
    gradient of (nearly) every query: the term is fed, not an empty zero."""
    cfg = StudentTrainConfig(data="d", out="o")  # the defaults under test
    # 400 images, batches of 16: a batch holds few of a query's cached negatives by chance
    a, owner = synthetic_lookup(0, cfg.hard_k, n_img=400)
    b, _ = synthetic_lookup(0, cfg.hard_k, score_seed=99, n_img=400)  # same pairs, other scores
    assert np.array_equal(a.i2t.cand, a.i2t.cand) and not np.array_equal(a.i2t.score, b.i2t.score)
    planner = BatchPlanner(
        np.arange(400),
        owner,
        16,
        lookup=a,
        negatives=cfg.negatives,
        neighbours_per_seed=cfg.neighbours_per_seed,
        batching=cfg.batching,
    )
    top, min_prob = cfg.valid_rule()
    st = DistillSettings(cfg.loss, cfg.lam, cfg.tau, cfg.tau_teacher, top, min_prob)
    changed, queries = 0, 0
    for batch in planner.epoch(0):
        sim = torch.rand(
            len(batch.image_pool),
            len(batch.caption_pool),
            generator=torch.Generator().manual_seed(3),
        ).requires_grad_()
        grads = []
        for lk in (a, b):
            terms = step_loss(sim, torch.tensor(10.0), 16, batch_lists(lk, batch), None, st)
            grads.append(torch.autograd.grad(terms["distill"], sim)[0])
        rows = (grads[0][:16] - grads[1][:16]).abs().sum(1) > 1e-6  # image queries
        cols = (grads[0][:, :16] - grads[1][:, :16]).abs().sum(0) > 1e-6  # caption queries
        changed += int(rows.sum() + cols.sum())
        queries += 32
    assert changed >= 0.9 * queries, (changed, queries)


def test_bank_reads_what_was_written_and_its_staleness():
    """write/read round trip with the step count; unwritten rows are an error; refresh fills."""
    bank = NegativeBank({"image": 4, "caption": 6}, 3)
    with pytest.raises(ValueError, match="never written; refresh the bank"):
        bank.read("image", np.array([0]), 0)
    emb = torch.arange(12, dtype=torch.float32).reshape(4, 3).requires_grad_()
    bank.refresh("image", np.arange(4), lambda ids: emb[torch.from_numpy(ids)] * 2, 3, step=5)
    bank.write("image", np.array([2]), -emb[2:3], step=9)
    rows, age = bank.read("image", np.array([2, 0]), step=10)
    torch.testing.assert_close(rows, torch.stack([-emb[2], 2 * emb[0]]).detach())
    assert age.tolist() == [1, 5] and not rows.requires_grad


def test_delivery_counts_used_and_available():
    """Delivery sums what each direction's lists held against what the queries had cached."""
    lookup, owner = synthetic_lookup(0, hard_k=5)
    planner = BatchPlanner(np.arange(N_IMG), owner, 6, lookup=lookup, negatives="inbatch")
    d = Delivery()
    lists = [batch_lists(lookup, b) for b in planner.epoch(0)]
    for ls, b in zip(lists, planner.epoch(0), strict=True):
        d.add(ls, lookup.pos_score[b.captions])
    got = d.summary()
    used = np.concatenate([ls[0].present for ls in lists])
    avail = np.concatenate([ls[0].cached for ls in lists])
    assert got["i2t"]["used"] == pytest.approx(used.mean())
    assert got["i2t"]["available"] == pytest.approx(avail.mean())
    assert got["i2t"]["min_share"] == pytest.approx((used / avail).min())
    assert got["i2t"]["no_positive"] == 0 and got["i2t"]["used"] < got["i2t"]["available"]
    assert Delivery(d.state).merged(d).summary() == got
