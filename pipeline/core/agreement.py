"""Did distillation take? How well a student orders each query's teacher-scored candidates the way
the teacher does (``cprd evaluate --teacher-scores``).

For every query of a split (image queries over captions, caption queries over images) its
candidates are the cached pairs that contain it with the other end in the same split (what the
teacher scored for that split's mined candidates, positives included). Per query with at least two
candidates:
- **Kendall tau-b** between the student's cosine and the teacher's score over its candidates
  (ties in either count as neither concordant nor discordant, as scipy's ``kendalltau``);
- **NDCG@10** of the student's order, the gain of a candidate being the teacher's match
  probability (sigmoid of the log-odds score), normalised by the teacher's own order.
Both are averaged over queries, per direction. Shape letters: Q queries, K candidates (padded).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

NDCG_AT = 10


def _padded(query: np.ndarray, values: list[np.ndarray]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Group parallel (E,) arrays by ``query`` into (Q, K) tensors plus the (Q, K) real mask."""
    order = np.argsort(query, kind="stable")
    q = query[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    counts = np.diff(np.r_[starts, len(q)])
    row = np.repeat(np.arange(len(starts)), counts)
    col = np.arange(len(q)) - np.repeat(starts, counts)
    shape = (len(starts), int(counts.max(initial=1)))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[row, col] = True
    out = []
    for v in values:
        t = torch.zeros(shape, dtype=torch.float64)
        t[row, col] = torch.from_numpy(np.asarray(v, dtype=np.float64)[order])
        out.append(t)
    return out, mask


def kendall_tau_b(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(Q,) tau-b per row over the real entries; NaN where it is undefined (fewer than two
    entries, or all tied in either list)."""
    ds = torch.sign(student[:, :, None] - student[:, None, :])  # (Q, K, K)
    dt = torch.sign(teacher[:, :, None] - teacher[:, None, :])  # (Q, K, K)
    pair = mask[:, :, None] & mask[:, None, :]
    pair = pair & torch.ones_like(pair[0]).triu(1)  # each unordered pair once
    s = (ds * dt * pair).sum(dim=(1, 2))
    a = ((dt != 0) & pair).sum(dim=(1, 2))
    b = ((ds != 0) & pair).sum(dim=(1, 2))
    tau = s / torch.sqrt((a * b).double())
    return torch.where((a > 0) & (b > 0), tau, torch.full_like(tau, float("nan")))


def ndcg(
    student: torch.Tensor, gain: torch.Tensor, mask: torch.Tensor, at: int = NDCG_AT
) -> torch.Tensor:
    """(Q,) NDCG@at of the student's order with the given gains (real entries only); NaN where
    the ideal DCG is 0. Student ties keep column order (a stable sort)."""
    discount = 1.0 / torch.log2(torch.arange(2, mask.shape[1] + 2, dtype=torch.float64))  # (K,)
    discount[at:] = 0.0
    g = gain.masked_fill(~mask, 0.0)
    order = torch.sort(student.masked_fill(~mask, -torch.inf), dim=1, descending=True, stable=True)
    dcg = (g.gather(1, order.indices) * discount).sum(1)
    ideal = (torch.sort(g, dim=1, descending=True).values * discount).sum(1)
    return torch.where(ideal > 0, dcg / ideal, torch.full_like(dcg, float("nan")))


def ranking_agreement(
    pairs: pl.DataFrame,
    image_emb: np.ndarray,
    image_ids: np.ndarray,
    caption_emb: np.ndarray,
    caption_ids: np.ndarray,
) -> dict:
    """{"i2t": {"kendall_tau", "ndcg@10", "queries"}, "t2i": {...}, "pairs"} over the cached
    ``pairs`` (image_id, caption_id, score) whose ends both have an embedding (row r of
    ``image_emb`` is image ``image_ids[r]``, unit norm; captions alike)."""
    img_row = pl.DataFrame({"image_id": image_ids, "i": np.arange(len(image_ids))})
    cap_row = pl.DataFrame({"caption_id": caption_ids, "c": np.arange(len(caption_ids))})
    p = (
        pairs.select(
            pl.col("image_id").cast(pl.Int64), pl.col("caption_id").cast(pl.Int64), "score"
        )
        .join(img_row.cast({"image_id": pl.Int64}), on="image_id")
        .join(cap_row.cast({"caption_id": pl.Int64}), on="caption_id")
    )
    i, c = p["i"].to_numpy(), p["c"].to_numpy()
    student = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), 1 << 16):  # (E, D) in chunks: no E x D copy at once
        sl = slice(s, s + (1 << 16))
        student[sl] = np.einsum("ed,ed->e", image_emb[i[sl]], caption_emb[c[sl]])
    teacher = p["score"].to_numpy().astype(np.float64)
    out: dict = {"pairs": len(i)}
    for name, query in (("i2t", i), ("t2i", c)):
        (s_t, t_t), mask = _padded(query, [student, teacher])
        rows = range(0, len(mask), 1024)  # (1024, K, K) at a time for the pairwise signs
        tau = torch.cat(
            [kendall_tau_b(s_t[r : r + 1024], t_t[r : r + 1024], mask[r : r + 1024]) for r in rows]
        )
        gains = ndcg(s_t, torch.sigmoid(t_t), mask)
        out[name] = {
            "kendall_tau": _mean(tau),
            f"ndcg@{NDCG_AT}": _mean(gains),
            "queries": int((mask.sum(1) >= 2).sum()),
        }
    return out


def _mean(x: torch.Tensor) -> float | None:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else None
