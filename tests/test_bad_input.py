"""Bad input to every command: exit 1, one `Error:` line naming the problem, nothing written.

Each case builds its command line from a shared set of real inputs (a dataset, candidates, a
teacher cache, a tiny teacher, a second dataset) plus files it writes into its own tmp dir. After
the run neither that dir nor the shared inputs may have changed: no partial output is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_error, mine_and_score, run, write_image


@pytest.fixture(scope="module")
def w(small_dataset, tiny_teacher_dir, demo_dataset_master, tmp_path_factory) -> SimpleNamespace:
    """The shared inputs (read-only): ds, cand, cache (an entry), cache_root, teacher, other."""
    base = tmp_path_factory.mktemp("bad-input")
    cache = mine_and_score(base, small_dataset, tiny_teacher_dir, k=2, shards=2)
    return SimpleNamespace(
        ds=small_dataset,
        cand=base / "cand",
        cache=cache,
        cache_root=cache.parent,
        teacher=tiny_teacher_dir,
        other=demo_dataset_master,
    )


def _csv(t: Path, body: str) -> Path:
    """A CSV table next to a good image a.png and an undecodable bad.png."""
    write_image(t / "a.png", (200, 10, 10), fmt="PNG")
    (t / "bad.png").write_bytes(b"not a png at all")
    (t / "t.csv").write_text(body)
    return t / "t.csv"


def _karpathy(t: Path, *entries: tuple[int, str]) -> list:
    """A Karpathy JSON of (imgid, filename) entries, its images, and the flags to import it."""
    images = []
    for imgid, name in entries:
        write_image(t / "imgs" / name, (10, 200, 10), fmt="PNG")
        images.append(
            {"imgid": imgid, "filename": name, "split": "train", "sentences": [{"raw": "a cat"}]}
        )
    (t / "k.json").write_text(json.dumps({"images": images}))
    return ["--karpathy", t / "k.json", "--images", t / "imgs"]


def _killed_early(t: Path) -> Path:
    """What train-student leaves when killed before its first checkpoint: config, no last.pt."""
    (t / "run").mkdir()
    (t / "run" / "config.json").write_text("{}")
    return t / "run"


def _xfail(reason: str, run_it: bool = True):
    return pytest.mark.xfail(strict=True, run=run_it, reason=reason)


TRAIN = ["--loss", "none", "--batching", "random"]  # train-student without a cache

CASES = [
    # ---- import-data ----
    ("import: no input", lambda w, t: ["import-data", "--out", t / "out"], ["exactly one input"]),
    (
        "import: --csv missing",
        lambda w, t: ["import-data", "--csv", t / "none.csv", "--out", t / "out"],
        ["--csv file", "does not exist"],
    ),
    (
        "import: a dataset dir as --csv",
        lambda w, t: ["import-data", "--csv", w.ds, "--out", t / "out"],
        ["--csv file", "is a directory"],
    ),
    (
        "import: --karpathy without --images",
        lambda w, t: ["import-data", *_karpathy(t, (0, "a.png"))[:2], "--out", t / "out"],
        ["--images"],
    ),
    (
        "import: a file as --images",
        lambda w, t: [
            "import-data",
            *_karpathy(t, (0, "a.png"))[:3],
            t / "k.json",
            "--out",
            t / "out",
        ],
        ["--images directory", "is a file"],
    ),
    (
        "import: corrupt image",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\nbad.png,x\n"),
            "--out",
            t / "out",
        ],
        ["bad.png (cannot decode", "--skip-bad-images"],
    ),
    (
        "import: missing image",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\nno.png,x\n"),
            "--out",
            t / "out",
        ],
        ["no.png (missing)", "--skip-bad-images"],
    ),
    (
        "import: empty caption",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\na.png,  \n"),
            "--out",
            t / "out",
        ],
        ["empty caption", "a.png"],
    ),
    (
        "import: huge caption",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\na.png," + "word " * 4000 + "\n"),
            "--out",
            t / "out",
        ],
        ["over 10000 characters", "a.png", "--caption-col"],
    ),
    (
        "import: duplicate imgid",
        lambda w, t: ["import-data", *_karpathy(t, (0, "a.png"), (0, "b.png")), "--out", t / "out"],
        ["imgid", "more than one image"],
    ),
    (
        "import: duplicate image",
        lambda w, t: ["import-data", *_karpathy(t, (0, "a.png"), (1, "a.png")), "--out", t / "out"],
        ["appear more than once", "a.png"],
    ),
    (
        "import: unknown split value",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption,split\na.png,x,dev\n"),
            "--out",
            t / "out",
        ],
        ["unknown split values", "dev"],
    ),
    (
        "import: unknown --default-split",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\na.png,x\n"),
            "--default-split",
            "dev",
            "--out",
            t / "out",
        ],
        ["--default-split", "dev"],
    ),
    (
        "import: --out exists",
        lambda w, t: ["import-data", "--csv", _csv(t, "image,caption\na.png,x\n"), "--out", w.ds],
        ["already exists", "--overwrite"],
    ),
    (
        "import: --overwrite a candidates dir",
        lambda w, t: [
            "import-data",
            "--csv",
            _csv(t, "image,caption\na.png,x\n"),
            "--out",
            w.cand,
            "--overwrite",
        ],
        ["--overwrite", "dataset.json", "not replacing it"],
    ),
    # ---- data-info ----
    ("data-info: missing", lambda w, t: ["data-info", t / "none"], ["does not exist"]),
    (
        "data-info: a candidates dir",
        lambda w, t: ["data-info", w.cand],
        ["a candidates dir, not a cprd dataset"],
    ),
    (
        "data-info: a cache",
        lambda w, t: ["data-info", w.cache],
        ["a teacher cache, not a cprd dataset"],
    ),
    ("data-info: a file", lambda w, t: ["data-info", t / "file.txt"], ["not a cprd dataset"]),
    # ---- demo-data ----
    (
        "demo-data: negative images",
        lambda w, t: ["demo-data", "--out", t / "out", "--train-images", -1],
        ["--train-images", ">= 1"],
    ),
    (
        "demo-data: tiny images",
        lambda w, t: ["demo-data", "--out", t / "out", "--image-size", 8],
        ["--image-size", ">= 32"],
    ),
    (
        "demo-data: zero captions",
        lambda w, t: ["demo-data", "--out", t / "out", "--captions-per-image", 0],
        ["--captions-per-image"],
    ),
    (
        "demo-data: negative seed",
        lambda w, t: ["demo-data", "--out", t / "out", "--seed", -1],
        ["--seed", ">= 0"],
    ),
    (
        "demo-data: --out exists",
        lambda w, t: ["demo-data", "--out", w.ds],
        ["already exists", "--overwrite"],
    ),
    (
        "demo-data: --overwrite a cache root",
        lambda w, t: ["demo-data", "--out", w.cache_root, "--overwrite"],
        ["--overwrite", "not replacing it"],
    ),
    (
        "demo-data: --out inside a file",
        lambda w, t: ["demo-data", "--out", t / "file.txt" / "out"],
        ["file.txt", "is a file"],
    ),
    # ---- mine-candidates ----
    (
        "mine: --data missing",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            t / "none",
            "--out",
            t / "out",
        ],
        ["does not exist"],
    ),
    (
        "mine: a cache as --data",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.cache,
            "--out",
            t / "out",
        ],
        ["a teacher cache, not a cprd dataset"],
    ),
    (
        "mine: negative --k",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--k",
            -1,
        ],
        ["--k", ">= 1"],
    ),
    (
        "mine: zero --batch-size",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--batch-size",
            0,
        ],
        ["--batch-size", ">= 1"],
    ),
    (
        "mine: unknown --split",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--split",
            "dev",
        ],
        ["unknown split", "dev"],
    ),
    (
        "mine: unknown --index",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--index",
            "lsh",
        ],
        ["--index", "lsh"],
    ),
    (
        "mine: unknown model",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--student",
            "NoNet",
        ],
        ["unknown model", "NoNet"],
    ),
    (
        "mine: a dataset as --student",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--student",
            w.ds,
        ],
        ["not a cprd student directory"],
    ),
    (
        "mine: a dataset as --embeddings-from",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--embeddings-from",
            w.ds,
        ],
        ["not a candidates dir"],
    ),
    (
        "mine: --embeddings-from another dataset",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.other,
            "--out",
            t / "out",
            "--embeddings-from",
            w.cand,
        ],
        ["--embeddings-from", "another dataset"],
    ),
    (
        "mine: --out exists",
        lambda w, t: ["mine-candidates", "--student", "tiny", "--data", w.ds, "--out", w.cand],
        ["already exists", "--overwrite"],
    ),
    (
        "mine: --overwrite a dataset dir",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            w.other,
            "--overwrite",
        ],
        ["--overwrite", "candidates.json", "not replacing it"],
    ),
    (
        "mine: unknown --device",
        lambda w, t: [
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--device",
            "gpu9",
        ],
        ["--device", "gpu9"],
    ),
    # ---- score-teacher ----
    (
        "score: --candidates missing",
        lambda w, t: ["score-teacher", "--candidates", t / "none", "--teacher", w.teacher],
        ["does not exist", "mine-candidates"],
    ),
    (
        "score: a dataset as --candidates",
        lambda w, t: ["score-teacher", "--candidates", w.ds, "--teacher", w.teacher],
        ["not a candidates dir"],
    ),
    (
        "score: a cache as --candidates",
        lambda w, t: ["score-teacher", "--candidates", w.cache, "--teacher", w.teacher],
        ["not a candidates dir"],
    ),
    (
        "score: zero --shards",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--shards",
            0,
        ],
        ["--shards", ">= 1"],
    ),
    (
        "score: zero --batch-size",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--batch-size",
            0,
        ],
        ["--batch-size", ">= 1"],
    ),
    (
        "score: --teacher missing",
        lambda w, t: ["score-teacher", "--candidates", w.cand, "--teacher", t / "none"],
        ["not a loadable BLIP"],
    ),
    (
        "score: a dataset as --teacher",
        lambda w, t: ["score-teacher", "--candidates", w.cand, "--teacher", w.ds],
        ["not a loadable BLIP"],
    ),
    (
        "score: --data of another dataset",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--data",
            w.other,
        ],
        ["not the one candidates", "--data"],
    ),
    (
        "score: --rank out of range",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--rank",
            3,
            "--world-size",
            2,
        ],
        ["--rank", "rank 3 of 2"],
    ),
    (
        "score: zero --world-size",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--world-size",
            0,
        ],
        ["--world-size", ">= 1"],
    ),
    (
        "score: --shard-ids beyond --shards",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--shards",
            4,
            "--shard-ids",
            9,
        ],
        ["--shard-ids", "shard 9"],
    ),
    (
        "score: bad --shard-ids",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--shard-ids",
            "3-x",
        ],
        ["--shard-ids", "3-x"],
    ),
    (
        "score: a file as --cache-dir",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--cache-dir",
            t / "file.txt",
        ],
        ["--cache-dir", "is a file"],
    ),
    (
        "score: a dataset as --cache-dir",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--cache-dir",
            w.ds,
        ],
        ["--cache-dir", "a dataset dir"],
    ),
    (
        "score: a cache entry as --cache-dir",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--cache-dir",
            w.cache,
        ],
        ["--cache-dir", "cache entry, not a cache root", "pass its parent"],
    ),
    (
        "score: --shards differs from the cache",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--cache-dir",
            w.cache_root,
            "--shards",
            3,
        ],
        ["has 2 shards", "--shards 2"],
    ),
    (
        "score: unknown --device",
        lambda w, t: [
            "score-teacher",
            "--candidates",
            w.cand,
            "--teacher",
            w.teacher,
            "--device",
            "gpu9",
        ],
        ["--device", "gpu9"],
    ),
    # ---- cache list / info / verify ----
    ("cache list: missing", lambda w, t: ["cache", "list", t / "none"], ["does not exist"]),
    ("cache list: a file", lambda w, t: ["cache", "list", t / "file.txt"], ["is a file"]),
    (
        "cache list: a dataset dir",
        lambda w, t: ["cache", "list", w.ds],
        ["a dataset dir", "not a cache root"],
    ),
    (
        "cache list: a cache entry",
        lambda w, t: ["cache", "list", w.cache],
        ["cache entry, not a cache root", "pass its parent"],
    ),
    ("cache info: missing", lambda w, t: ["cache", "info", t / "none"], ["does not exist"]),
    (
        "cache info: a dataset dir",
        lambda w, t: ["cache", "info", w.ds],
        ["not a teacher cache entry", "dataset dir"],
    ),
    (
        "cache info: a candidates dir",
        lambda w, t: ["cache", "info", w.cand],
        ["not a teacher cache entry", "candidates dir"],
    ),
    (
        "cache info: a cache root",
        lambda w, t: ["cache", "info", w.cache_root],
        ["not a teacher cache entry", "cache root"],
    ),
    ("cache verify: missing", lambda w, t: ["cache", "verify", t / "none"], ["does not exist"]),
    (
        "cache verify: a candidates dir",
        lambda w, t: ["cache", "verify", w.cand],
        ["not a teacher cache entry", "candidates dir"],
    ),
    (
        "cache verify: a cache root",
        lambda w, t: ["cache", "verify", w.cache_root],
        ["not a teacher cache entry", "cache root"],
    ),
    (
        "cache verify: --teacher without --repair",
        lambda w, t: ["cache", "verify", w.cache, "--teacher", w.teacher],
        ["--teacher", "only goes with --repair"],
    ),
    (
        "cache verify: --data without --candidates",
        lambda w, t: ["cache", "verify", w.cache, "--data", w.ds],
        ["--data", "only goes with --candidates"],
    ),
    (
        "cache verify: zero --batch-size",
        lambda w, t: ["cache", "verify", w.cache, "--repair", "--batch-size", 0],
        ["--batch-size", ">= 1"],
    ),
    # ---- train-teacher ----
    (
        "train-teacher: --data missing",
        lambda w, t: ["train-teacher", "--data", t / "none", "--out", t / "out"],
        ["does not exist"],
    ),
    (
        "train-teacher: a candidates dir as --data",
        lambda w, t: ["train-teacher", "--data", w.cand, "--out", t / "out"],
        ["a candidates dir, not a cprd dataset"],
    ),
    (
        "train-teacher: zero epochs",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--epochs", 0],
        ["epochs", ">= 1"],
    ),
    (
        "train-teacher: zero batch",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--batch-size", 0],
        ["--batch-size", ">= 1"],
    ),
    (
        "train-teacher: unknown --base",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--base", "no-such"],
        ["no-such", "not a loadable BLIP"],
    ),
    (
        "train-teacher: --out exists",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", w.cand],
        ["already exists", "--overwrite"],
    ),
    (
        "train-teacher: unknown --device",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--device", "gpu9"],
        ["--device", "gpu9"],
    ),
    (
        "train-teacher: negative lr",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--lr", -1],
        ["--lr", "> 0"],
    ),
    (
        "train-teacher: negative weight decay",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--weight-decay", -1],
        ["--weight-decay", ">= 0"],
    ),
    (
        "train-teacher: zero image size",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--image-size", 0],
        ["--image-size", ">= 1"],
    ),
    (
        "train-teacher: zero temperature",
        lambda w, t: ["train-teacher", "--data", w.ds, "--out", t / "out", "--itc-temperature", 0],
        ["--itc-temperature", "> 0"],
    ),
    # ---- train-student ----
    (
        "train-student: --data missing",
        lambda w, t: ["train-student", "--data", t / "none", "--out", t / "out", *TRAIN],
        ["does not exist"],
    ),
    (
        "train-student: a cache as --data",
        lambda w, t: ["train-student", "--data", w.cache, "--out", t / "out", *TRAIN],
        ["a teacher cache, not a cprd dataset"],
    ),
    (
        "train-student: a candidates dir as --teacher-scores",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--teacher-scores",
            w.cand,
        ],
        ["not a teacher cache entry", "candidates dir"],
    ),
    (
        "train-student: --teacher-scores missing",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--teacher-scores",
            t / "none",
        ],
        ["does not exist", "score-teacher"],
    ),
    (
        "train-student: a dataset as --candidates",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--loss",
            "none",
            "--candidates",
            w.ds,
        ],
        ["not a candidates dir"],
    ),
    (
        "train-student: a cache of another dataset",
        lambda w, t: [
            "train-student",
            "--data",
            w.other,
            "--out",
            t / "out",
            "--teacher-scores",
            w.cache,
        ],
        ["another dataset", "score-teacher"],
    ),
    (
        "train-student: candidates of another dataset",
        lambda w, t: [
            "train-student",
            "--data",
            w.other,
            "--out",
            t / "out",
            "--loss",
            "none",
            "--candidates",
            w.cand,
        ],
        ["--candidates", "another dataset"],
    ),
    (
        "train-student: negative lr",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", *TRAIN, "--lr", -1],
        ["--lr", "> 0"],
    ),
    (
        "train-student: zero batch",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            *TRAIN,
            "--batch-size",
            0,
        ],
        ["--batch-size", ">= 2"],
    ),
    (
        "train-student: zero epochs",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", *TRAIN, "--epochs", 0],
        ["--epochs", ">= 1"],
    ),
    (
        "train-student: negative seed",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", *TRAIN, "--seed", -1],
        ["--seed", ">= 0"],
    ),
    (
        "train-student: probability above 1",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--teacher-scores",
            w.cache,
            "--valid-min-prob",
            2,
        ],
        ["--valid-min-prob", "[0, 1]"],
    ),
    (
        "train-student: unknown --loss",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", "--loss", "hinge"],
        ["--loss", "hinge"],
    ),
    (
        "train-student: unknown --negatives",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--teacher-scores",
            w.cache,
            "--negatives",
            "all",
        ],
        ["--negatives", "all"],
    ),
    (
        "train-student: unknown --batching",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            "--loss",
            "none",
            "--batching",
            "smart",
        ],
        ["--batching", "smart"],
    ),
    (
        "train-student: a distillation loss without a cache",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", "--loss", "kl"],
        ["--teacher-scores"],
    ),
    (
        "train-student: unknown model",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            *TRAIN,
            "--student",
            "NoNet",
        ],
        ["unknown model", "NoNet"],
    ),
    (
        "train-student: unknown --device",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            t / "out",
            *TRAIN,
            "--device",
            "gpu9",
        ],
        ["--device", "gpu9"],
    ),
    (
        "train-student: --resume without a checkpoint",
        lambda w, t: ["train-student", "--data", w.ds, "--out", t / "out", *TRAIN, "--resume"],
        ["--resume", "last.pt"],
    ),
    (
        "train-student: --resume a run killed before its first checkpoint",
        lambda w, t: [
            "train-student",
            "--data",
            w.ds,
            "--out",
            _killed_early(t),
            *TRAIN,
            "--resume",
        ],
        ["--resume", "before its first checkpoint", "--overwrite"],
    ),
    (
        "train-student: --out exists",
        lambda w, t: ["train-student", "--data", w.ds, "--out", w.cand, *TRAIN],
        ["--out", "already exists"],
    ),
    (
        "train-student: --overwrite a dataset dir",
        lambda w, t: ["train-student", "--data", w.ds, "--out", w.other, *TRAIN, "--overwrite"],
        ["--overwrite", "not a train-student output"],
    ),
    # ---- evaluate ----
    (
        "evaluate: --data missing",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", t / "none"],
        ["does not exist"],
    ),
    (
        "evaluate: a candidates dir as --data",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.cand],
        ["a candidates dir, not a cprd dataset"],
    ),
    (
        "evaluate: unknown --split",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.ds, "--split", "dev"],
        ["unknown split", "dev"],
    ),
    (
        "evaluate: zero --batch-size",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.ds, "--batch-size", 0],
        ["--batch-size", ">= 1"],
    ),
    (
        "evaluate: zero --rerank-k",
        lambda w, t: [
            "evaluate",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--rerank-teacher",
            w.teacher,
            "--rerank-k",
            0,
        ],
        ["--rerank-k", ">= 1"],
    ),
    (
        "evaluate: unknown model",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.ds, "--student", "NoNet"],
        ["unknown model", "NoNet"],
    ),
    (
        "evaluate: a candidates dir as --student",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.ds, "--student", w.cand],
        ["not a cprd student directory"],
    ),
    (
        "evaluate: --rerank-teacher missing",
        lambda w, t: [
            "evaluate",
            "--student",
            "tiny",
            "--data",
            w.ds,
            "--rerank-teacher",
            t / "none",
        ],
        ["not a loadable BLIP"],
    ),
    (
        "evaluate: unknown --device",
        lambda w, t: ["evaluate", "--student", "tiny", "--data", w.ds, "--device", "gpu9"],
        ["--device", "gpu9"],
    ),
    # ---- demo ----
    ("demo: negative seed", lambda w, t: ["demo", "--out", t / "out", "--seed", -1], ["--seed"]),
    (
        "demo: --out inside a file",
        lambda w, t: ["demo", "--out", t / "file.txt" / "out"],
        ["file.txt", "is a file"],
    ),
    (
        "demo: a dataset dir as --out",
        lambda w, t: ["demo", "--out", w.ds],
        ["--out", "no `cprd demo` wrote"],
    ),
]


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _tree(*roots: Path) -> set[tuple[str, int]]:
    """Every path under ``roots`` with its size: what must not change."""
    return {
        (str(p), p.stat().st_size if p.is_file() else -1)
        for root in roots
        for p in [root, *root.rglob("*")]
        if p.exists()
    }


@pytest.mark.parametrize("name,make_args,fragments", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input(w, tmp_path, name, make_args, fragments):
    """One bad input: exit 1, one Error line naming it, no traceback, nothing written anywhere."""
    (tmp_path / "file.txt").write_text("not a directory\n")
    args = make_args(w, tmp_path)
    if args[0] == "score-teacher" and "--cache-dir" not in args:
        args += ["--cache-dir", tmp_path / "cache"]
    before = _tree(tmp_path, w.ds, w.cand, w.cache_root, w.other)
    assert_error(run(*args), *fragments)
    assert _tree(tmp_path, w.ds, w.cand, w.cache_root, w.other) == before
