"""The stage commands of cprd's command line: mine-candidates, evaluate, score-teacher."""

from __future__ import annotations

from pathlib import Path

import click

from cli_common import (
    CONTEXT,
    _emit,
    _positive,
    ann_settings_options,
    device_option,
    json_option,
    overwrite_option,
    precision_option,
)
from cli_serve import STUDENT_HELP

# Required: a forgotten --student once evaluated a random `tiny` model without a word.
student_option = click.option("--student", required=True, help=STUDENT_HELP)


@click.command("mine-candidates", context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset dir.")
@student_option
@click.option("--split", default="train", show_default=True, help="Split to mine.")
@click.option("--k", default=32, show_default=True, help="Candidates kept per query.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Candidates dir.")
@click.option(
    "--index",
    type=click.Choice(["flat", "ivf", "hnsw"]),
    default="flat",
    show_default=True,
    help="FAISS index: exact flat, or approximate ivf/hnsw (recall measured and printed).",
)
@ann_settings_options
@click.option(
    "--target-recall",
    type=float,
    default=None,
    help="ivf/hnsw: double --nprobe / --ef-search until recall@k against exact search on 1000 "
    "sampled queries reaches this (0 < R <= 1, e.g. 0.95); the setting and the recall go in the "
    "manifest.",
)
@click.option("--batch-size", default=64, show_default=True, help="Encoding batch size.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seed (random init of `tiny`, the recall sample).",
)
@click.option(
    "--embeddings-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Reuse the embeddings of another candidates dir (same data, split, weights).",
)
@device_option
@precision_option
@overwrite_option
@json_option
def mine_candidates(
    data,
    student,
    split,
    k,
    out,
    index,
    nlist,
    nprobe,
    hnsw_m,
    ef_construction,
    ef_search,
    target_recall,
    batch_size,
    seed,
    embeddings_from,
    device,
    precision,
    overwrite,
    as_json,
):
    """Mine each query's top-k candidates in both directions with a dual encoder and FAISS.

    Writes OUT/candidates.parquet (direction, query_id, candidate_id, rank, score, is_positive),
    the embeddings it used, and a manifest. Re-mining into the same OUT with --overwrite (e.g.
    another --k) reuses the embeddings when the model and data are unchanged.

    Example:

    \b
        cprd mine-candidates --data data/demo --student runs/itc --k 32 --out data/cand
    """
    from pipeline.stages.mine import MineConfig, mine_candidates

    _positive(batch_size=batch_size)
    cfg = MineConfig(
        data=data,
        student=student,
        out=out,
        split=split,
        k=k,
        index=index,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        target_recall=target_recall,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        embeddings_from=embeddings_from,
        overwrite=overwrite,
    )
    m = mine_candidates(cfg)
    summary = {
        "command": "mine-candidates",
        "out": str(out),
        "split": split,
        "k": k,
        "k_used": m["k_used"],
        "counts": m["counts"],
        "index": m["index"],
        "index_recall": m["index_recall"],
        "index_settings": {d: r["settings"] for d, r in m["index_search"].items()},
        "fingerprint": m["dataset"]["fingerprint"],
        "false_negatives": m.get("false_negatives"),
    }
    c = m["counts"]
    fn = m.get("false_negatives")
    _emit(
        summary,
        as_json,
        f"mined {c['i2t']} image->text and {c['t2i']} text->image "
        f"candidates ({c['images']} images, {c['captions']} captions) into {out}"
        + (
            f"\nfalse negatives (true matches among mined non-positives, by the dataset's "
            f"relation): {fn['all']:.1%} (image->text {fn['i2t']:.1%}, text->image "
            f"{fn['t2i']:.1%})"
            if fn and fn["all"] is not None
            else ""
        ),
    )


@click.command("evaluate", context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset dir.")
@student_option
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--batch-size", default=64, show_default=True, help="Encoding batch size.")
@click.option("--seed", default=0, show_default=True, help="Seed (random init of `tiny`).")
@click.option(
    "--rerank-teacher", default=None, help="Also report the top-K re-ranked by this teacher."
)
@click.option("--rerank-k", default=128, show_default=True, help="K re-ranked by the teacher.")
@click.option(
    "--teacher-scores",
    default=None,
    type=click.Path(path_type=Path),
    help="A teacher cache entry holding this split's scored candidates: also report how well the "
    "student orders each query's candidates as the teacher does (Kendall tau, NDCG@10).",
)
@click.option(
    "--rerank-score",
    type=click.Choice(["itm", "itm+itc"]),
    default="itm",
    show_default=True,
    help="Re-rank by the ITM logit alone, or by ITM logit + the dual encoder's cosine (itm+itc: "
    "LAVIS's default, use it to compare with published BLIP numbers).",
)
@device_option
@precision_option
@json_option
def evaluate_cmd(
    data,
    student,
    split,
    batch_size,
    seed,
    rerank_teacher,
    rerank_k,
    rerank_score,
    teacher_scores,
    device,
    precision,
    as_json,
):
    """Recall@1/5/10 both directions and RSUM (percent) of a dual encoder on one split.

    Flickr30K/COCO protocol: an image query is correct at K if any of its captions is in its
    top K; a caption query if its image is. RSUM is the sum of the six recalls.

    Example:

    \b
        cprd evaluate --data data/demo --student runs/cprd --split test --json
    """
    from pipeline.stages.evaluate import EvalConfig, evaluate

    _positive(batch_size=batch_size, rerank_k=rerank_k)
    cfg = EvalConfig(
        data=data,
        student=student,
        split=split,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        rerank_teacher=rerank_teacher,
        rerank_k=rerank_k,
        teacher_scores=teacher_scores,
        rerank_score=rerank_score,
    )
    result = evaluate(cfg)
    rows = [{"name": "dual-encoder", **result["metrics"]}]
    if "rerank_metrics" in result:
        name = f"teacher-rerank@{rerank_k}" + (
            "" if rerank_score == "itm" else f" ({rerank_score})"
        )
        rows.append({"name": name, **result["rerank_metrics"]})
    if "metrics_full" in result:
        rows.insert(1, {"name": "dual-encoder [full relation]", **result["metrics_full"]})
    if "rerank_metrics_full" in result:
        rows.append(
            {"name": f"{rows[-1]['name']} [full relation]", **result["rerank_metrics_full"]}
        )
    summary = {
        "command": "evaluate",
        "split": split,
        "student": student,
        "images": result["images"],
        "captions": result["captions"],
        **result["metrics"],
        "rows": rows,
        "rerank": result.get("rerank_metrics"),
        "ranking_agreement": result.get("ranking_agreement"),
    }
    if "metrics_full" in result:  # any truly matching item counts (the dataset's relation)
        summary["metrics_full"] = result["metrics_full"]
        summary["rsum_full"] = result["rsum_full"]
        summary["rerank_full"] = result.get("rerank_metrics_full")
    if not as_json:
        from pipeline.stages.report import table

        click.echo(table(rows))
        if result.get("ranking_agreement"):
            ra = result["ranking_agreement"]
            click.echo(
                "agreement with the teacher over its scored candidates: Kendall tau i2t "
                f"{ra['i2t']['kendall_tau']:.3f}, t2i {ra['t2i']['kendall_tau']:.3f}; NDCG@10 i2t "
                f"{ra['i2t']['ndcg@10']:.3f}, t2i {ra['t2i']['ndcg@10']:.3f}"
            )
    _emit(summary, as_json, f"{result['images']} images, {result['captions']} captions ({split})")


# ---- stage 2: the teacher cache ------------------------------------------------------------------


@click.command("score-teacher", context_settings=CONTEXT)
@click.option(
    "--candidates",
    required=True,
    type=click.Path(path_type=Path),
    help="Candidates dir from mine-candidates.",
)
@click.option("--teacher", required=True, help="BLIP ITM checkpoint dir (or hub id).")
@click.option(
    "--shards",
    default=64,
    show_default=True,
    help="Shard count of a new cache (an existing cache keeps its own).",
)
@click.option(
    "--cache-dir",
    default=Path("data/cache"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Cache root; the entry is CACHE_DIR/<key>.",
)
@click.option("--shard-ids", default=None, help="Only these shards, e.g. 0-15,32.")
@click.option(
    "--rank", type=int, default=None, help="Worker rank [default: torchrun/Slurm env, else 0]."
)
@click.option("--world-size", type=int, default=None, help="Workers [default: env, else 1].")
@click.option("--batch-size", default=64, show_default=True, help="Caption batch size.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset dir [default: the one recorded in the candidates].",
)
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Processes decoding and preprocessing images ahead of the teacher [default: 4 on "
    "CUDA, 0 on CPU].",
)
@device_option
@precision_option
@json_option
def score_teacher_cmd(
    candidates,
    teacher,
    shards,
    cache_dir,
    shard_ids,
    rank,
    world_size,
    batch_size,
    num_workers,
    data,
    device,
    precision,
    as_json,
):
    """Score every unique candidate pair with the cross-encoder once, into a sharded cache.

    The ground-truth pairs of the candidates' split are scored too. Pairs already in the cache
    are not scored again; a killed run resumes; N machines can each take a share
    (--rank/--world-size, torchrun or a Slurm array). "complete" means every pair is cached.

    Example:

    \b
        cprd score-teacher --candidates data/cand --teacher runs/teacher --shards 64 \\
            --cache-dir data/cache --json
    """
    from pipeline.stages.score import ScoreConfig, parse_shard_ids, score_teacher

    _positive(shards=shards, batch_size=batch_size)
    cfg = ScoreConfig(
        candidates=candidates,
        teacher=teacher,
        cache_dir=cache_dir,
        shards=shards,
        shard_ids=parse_shard_ids(shard_ids) if shard_ids else None,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        data=data,
        device=device,
        precision=precision,
    )
    summary = {"command": "score-teacher", **score_teacher(cfg)}
    if "teacher_score" in summary and not as_json:
        click.echo(_distribution_table(summary["teacher_score"], summary["miner_score"]))
    state = (
        "complete: every pair of these candidates is cached"
        if summary["complete"]
        else f"incomplete: {summary['pairs_missing']} pairs not cached yet (other shards pending; "
        "run the same command again once they finish)"
    )
    pos = summary["positives"]
    _emit(
        summary,
        as_json,
        f"scored {summary['pairs_scored']} of {summary['pairs_total']} pairs "
        f"({summary['pairs_candidates']} of the candidates, {pos['added']} more positives of "
        f"the split; {pos['cached']} of {pos['total']} positives cached; "
        f"{summary['shards_written']} shards written, {summary['shards_skipped']} skipped); "
        f"cache {state}: {summary['cache_path']}",
    )


def _distribution_table(teacher: dict, miner: dict) -> str:
    keys = list(teacher)
    lines = [f"{'scores':<10}" + "".join(f"{k:>9}" for k in keys)]
    for name, d in (("teacher", teacher), ("miner", miner)):
        lines.append(f"{name:<10}" + "".join(f"{d[k]:>9.3f}" for k in keys))
    return "\n".join(lines)


COMMANDS = (mine_candidates, evaluate_cmd, score_teacher_cmd)
