"""BLIP's retrieval losses: ITC (image-text contrastive) and ITM with in-batch hard negatives.

Letters in shape comments: B pairs in the batch, K hard negatives per query, V image tokens,
D hidden width, L tokens, E shared embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from teacher.model import itm_logits


def blip_itc_loss(sim_i2t: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """L = (CE(sim_i2t, P) + CE(sim_i2t^T, P^T)) / 2, with soft targets P = positive / row sum.

    ``sim_i2t`` (B, B) holds temperature-scaled similarities of image i and caption j;
    ``positive`` (B, B) bool marks pairs of the same image (several captions of one image in a
    batch are all positives, as in BLIP's retrieval fine-tuning).
    """
    if sim_i2t.shape != positive.shape or sim_i2t.ndim != 2:
        raise ValueError(
            f"sim_i2t {tuple(sim_i2t.shape)} and positive {tuple(positive.shape)} must be the "
            "same (B, B) shape"
        )
    pos = positive.float()
    i2t = -(F.log_softmax(sim_i2t, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * pos.t() / pos.t().sum(1, keepdim=True)).sum(1)
    return (i2t + t2i.mean()) / 2


def sample_hard_negatives(
    sim: torch.Tensor, positive: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, ``k`` negative columns drawn without replacement with p ~ softmax(sim).

    ``sim`` (B, B) is temperature-scaled; ``positive`` (B, B) marks columns that must never be
    drawn (BLIP/ALBEF's hard-negative mining). Returns ``(rows, cols)``, each (R,): the pairs
    drawn, so a row whose batch holds fewer than ``k`` negatives contributes what it has.
    """
    weights = F.softmax(sim.detach().float(), dim=1).masked_fill(positive, 0.0)  # (B, B)
    # A tiny floor keeps every true negative drawable even when softmax underflows.
    weights = torch.where(positive, weights, weights + 1e-6)
    available = (~positive).sum(1)  # (B,)
    rows, cols = [], []
    for r in torch.nonzero(available > 0).flatten().tolist() if k > 0 else []:
        n = min(k, int(available[r]))
        c = torch.multinomial(weights[r], n, replacement=False, generator=generator)
        rows.append(torch.full((n,), r, dtype=torch.long))
        cols.append(c)
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(rows).to(sim.device), torch.cat(cols).to(sim.device)


def blip_losses(
    model: BlipForImageTextRetrieval,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positive: torch.Tensor,
    *,
    temperature: float,
    num_hard_negatives: int,
    num_random_negatives: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Named loss terms and ITM accuracy for a batch of B (image, caption) pairs.

    Pair b is image b with caption b; ``positive`` (B, B) marks image i / caption j pairs that
    match (same image, or identical text). Returns ``{"itc", "itm", "itm_acc"}``; the trainer
    weighs and sums the losses.
    """
    # Vision once; its [CLS] feeds ITC and its tokens feed every ITM pair of that image.
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, V, D)
    text_cls = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state[:, 0, :]  # (B, D): the unimodal text pass, no cross-attention
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)  # (B, E)
    text_feat = F.normalize(model.text_proj(text_cls), dim=-1)  # (B, E)
    sim_i2t = image_feat @ text_feat.t() / temperature  # (B, B)
    itc = blip_itc_loss(sim_i2t, positive)

    # Hard negatives, mined from the model's own contrastive similarities: for each image a
    # caption it confuses, for each caption an image it confuses.
    ti, tc = sample_hard_negatives(sim_i2t, positive, num_hard_negatives, generator)  # image->text
    ci, cc = sample_hard_negatives(sim_i2t.t(), positive.t(), num_hard_negatives, generator)
    if num_random_negatives:
        # Uniform negatives too: once ITC knows the bag of words, every mined negative is a
        # same-words sibling, and a model from scratch gets no easy signal to learn to look.
        flat = torch.zeros_like(sim_i2t)
        ri, rc = sample_hard_negatives(flat, positive, num_random_negatives, generator)
        qi, qc = sample_hard_negatives(flat, positive.t(), num_random_negatives, generator)
        ti, tc, ci, cc = (
            torch.cat([ti, ri]),
            torch.cat([tc, rc]),
            torch.cat([ci, qi]),
            torch.cat([cc, qc]),
        )
    b = torch.arange(input_ids.shape[0], device=input_ids.device)
    img_idx = torch.cat([b, ti, cc])  # (P,) image of each ITM pair
    txt_idx = torch.cat([b, tc, ci])  # (P,) caption of each ITM pair
    labels = torch.cat([torch.ones_like(b), torch.zeros_like(ti), torch.zeros_like(cc)])
    out = itm_logits(
        model, image_embeds[img_idx], input_ids[txt_idx], attention_mask[txt_idx]
    )  # (P, 2)
    itm = F.cross_entropy(out, labels)
    itm_acc = (out.argmax(dim=1) == labels).float().mean()
    return {"itc": itc, "itm": itm, "itm_acc": itm_acc.detach()}
