"""No file from a user path is unpickled: a checkpoint carrying a pickled object is refused, and
the object's code never runs (each case checks that the file it would create does not appear)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import assert_error, run

from pipeline.core.atomic import file_sha256
from pipeline.core.safe_load import load_tensors
from student.models import TINY_MODEL_CFG, load_model, load_student, save_student
from student.storage import STUDENT_JSON


class Payload:
    """Unpickling this opens (creates) ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def poisoned(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    """Save ``tensors`` (default: one) plus a Payload to ``path`` with torch.save."""
    torch.save({**(tensors or {"w": torch.ones(2)}), "payload": Payload(marker)}, path)
    return path


def test_load_tensors_refuses_pickled_objects(tmp_path):
    """Tensors load; a pickled object is a ValueError naming the file, and it never runs."""
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(3), "meta": {"step": 1, "name": "x"}}, plain)
    assert load_tensors(plain, "fix")["meta"] == {"step": 1, "name": "x"}
    bad, marker = tmp_path / "bad.pt", tmp_path / "ran"
    with pytest.raises(ValueError, match=r"bad\.pt' holds pickled Python objects.*: save it"):
        load_tensors(poisoned(bad, marker), "save it")
    assert not marker.exists()


def test_student_dir_with_pickled_weights_is_refused(tmp_path):
    """A student dir whose weights (checksum updated to match) carry a pickled object."""
    torch.manual_seed(0)
    tiny = load_model("tiny")
    out = save_student(tiny.model, tiny.model_cfg, tmp_path / "stu", base_spec="tiny")
    marker = tmp_path / "ran"
    poisoned(out / "model.pt", marker, tiny.model.state_dict())
    meta = json.loads((out / STUDENT_JSON).read_text())
    meta["weights_sha256"] = file_sha256(out / "model.pt")
    (out / STUDENT_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.pt' holds pickled Python objects"):
        load_student(out)
    assert not marker.exists()


def test_open_clip_checkpoint_with_pickled_object_is_refused(tmp_path):
    """NAME:/path.pt goes through open_clip with weights_only: refused with a clear error."""
    cfg_file = tmp_path / "cprd-test-safe.json"
    cfg_file.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(cfg_file)
    state = open_clip.create_model("cprd-test-safe").state_dict()
    marker = tmp_path / "ran"
    ckpt = poisoned(tmp_path / "ckpt.pt", marker, state)
    with pytest.raises(ValueError, match="ckpt.pt' in model spec .* holds pickled Python objects"):
        load_model(f"cprd-test-safe:{ckpt}")
    assert not marker.exists()


def test_resume_from_pickled_checkpoint_is_refused(small_dataset, tmp_path):
    """train-student --resume with a last.pt carrying a pickled object: one error line."""
    out, marker = tmp_path / "run", tmp_path / "ran"
    out.mkdir()
    poisoned(out / "last.pt", marker)
    result = run(
        "train-student", "--data", small_dataset, "--out", out, "--resume", "--loss", "none",
        "--batching", "random", "--epochs", "1", "--num-workers", "0",
    )  # fmt: skip
    assert_error(result, "last.pt' holds pickled Python objects", "resume only from")
    assert not marker.exists()


def test_teacher_with_pickled_bin_is_refused(tiny_teacher_dir, tmp_path):
    """A BLIP dir whose pytorch_model.bin carries a pickled object: not loadable, never run."""
    from safetensors.torch import load_file

    from teacher.model import load_teacher

    teacher, marker = tmp_path / "blip", tmp_path / "ran"
    shutil.copytree(tiny_teacher_dir, teacher)
    state = load_file(teacher / "model.safetensors")
    (teacher / "model.safetensors").unlink()
    poisoned(teacher / "pytorch_model.bin", marker, state)
    with pytest.raises(ValueError, match="not a loadable BLIP .*pickled Python objects"):
        load_teacher(str(teacher))
    assert not marker.exists()
