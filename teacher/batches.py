"""Batches of lexical neighbours, so that in-batch hard negatives are actually hard.

BLIP/ALBEF mine ITM negatives inside the batch; with random batches of a large dataset the
negatives are easy. As in BM25 hard-negative mining for text retrieval, images whose captions
share most of their words are put in the same batch: a generic rule (TF-IDF cosine of each
image's caption bag of words) that, on the demo data, gathers each contrast group.

Letters in shape comments: N images, V vocabulary, C images in one chunk, K neighbours.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

_WORD = re.compile(r"\w+", re.UNICODE)


def _bags(texts_per_image: list[list[str]]) -> tuple[torch.Tensor, int]:
    """(N, V) sparse L2-normalised TF-IDF rows over each image's caption words, and V."""
    vocab: dict[str, int] = {}
    rows, cols, counts = [], [], []
    for i, texts in enumerate(texts_per_image):
        bag: dict[int, int] = {}
        for text in texts:
            for word in _WORD.findall(text.lower()):
                j = vocab.setdefault(word, len(vocab))
                bag[j] = bag.get(j, 0) + 1
        rows += [i] * len(bag)
        cols += list(bag)
        counts += list(bag.values())
    n, v = len(texts_per_image), max(len(vocab), 1)
    cols_t = torch.tensor(cols, dtype=torch.long)
    df = torch.bincount(cols_t, minlength=v).float()  # (V,) images containing each word
    idf = torch.log((1 + n) / (1 + df)) + 1.0
    vals = (1.0 + torch.log(torch.tensor(counts, dtype=torch.float))) * idf[cols_t]
    norms = torch.zeros(n).index_add_(0, torch.tensor(rows, dtype=torch.long), vals**2).sqrt()
    vals = vals / norms[torch.tensor(rows, dtype=torch.long)].clamp_min(1e-12)
    idx = torch.stack([torch.tensor(rows, dtype=torch.long), cols_t])
    return torch.sparse_coo_tensor(idx, vals, (n, v), check_invariants=True).coalesce(), v


def tfidf_rows(texts_per_item: list[list[str]]) -> torch.Tensor:
    """(N, V) sparse L2-normalised TF-IDF rows, one per item (the union of its texts' words):
    the dot product of two rows is their TF-IDF cosine."""
    return _bags(texts_per_item)[0]


def lexical_neighbours(
    texts_per_image: list[list[str]], k: int, chunk_size: int = 1024
) -> np.ndarray:
    """(N, K) int64: for each image the K other images with the most similar caption words.

    Similarity is TF-IDF cosine over the union of an image's captions; computed a chunk of rows
    at a time, so memory stays at (N, chunk_size). Rows with fewer than K others are padded -1.
    """
    n = len(texts_per_image)
    k_eff = min(k, n - 1)
    out = np.full((n, k), -1, dtype=np.int64)
    if k_eff <= 0:
        return out
    x, _ = _bags(texts_per_image)  # (N, V) sparse
    x_t = x.t().coalesce()  # (V, N)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sel = torch.arange(start, stop)
        chunk = x.index_select(0, sel).to_dense()  # (C, V)
        sim = torch.sparse.mm(x_t.t(), chunk.t()).t()  # (C, N)
        sim[torch.arange(stop - start), sel] = -math.inf  # never your own neighbour
        top = sim.topk(k_eff, dim=1).indices  # (C, K)
        out[start:stop, :k_eff] = top.numpy()
    return out


def neighbour_batches(
    neighbours: np.ndarray, batch_size: int, group_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of batches (row indices, every row exactly once) built from neighbour clusters.

    Seeds are visited in random order; each seed takes its nearest ``group_size - 1`` neighbours
    not yet used, so a cluster is a set of lexically near images. Clusters are shuffled and packed
    into batches of ``batch_size`` (the last one may be smaller).
    """
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size}, {group_size}")
    n = neighbours.shape[0]
    used = np.zeros(n, dtype=bool)
    clusters: list[list[int]] = []
    for seed in rng.permutation(n):
        if used[seed]:
            continue
        used[seed] = True
        cluster = [int(seed)]
        for j in neighbours[seed]:
            if len(cluster) >= group_size:
                break
            if j >= 0 and not used[j]:
                used[j] = True
                cluster.append(int(j))
        clusters.append(cluster)
    order = np.concatenate([clusters[i] for i in rng.permutation(len(clusters))])
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]
