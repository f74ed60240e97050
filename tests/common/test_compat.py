"""Artifacts written by earlier dfkd versions still load: a bank and a checkpoint from dfkd 0.2-0.6.

``tests/fixtures/v0.2/`` was written with the code of commit f29d318 (version 0.2.0 in the files; bank and
checkpoint schema version 1): a 6-image DeepInversion-kind bank with teacher logits, and a LeNet-5-half student
checkpoint with its outputs on two inputs. Schema 1 knew no task, no (H, W) sizes, ``accuracy`` and ``role``
instead of ``metrics`` and ``kind``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from safetensors.torch import load_file

from dfkd_common.bank import bank_info, load_bank, verify_bank
from dfkd_common.checkpoint import load_model, read_meta
from dfkd_common.data import get_dataset
from dfkd_common.errors import DfkdError

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "v0.2"
INFO = get_dataset("mnist5k").info


def test_a_schema_1_bank_reads_as_a_classification_bank() -> None:
    with h5py.File(OLD / "bank.h5") as h5:
        assert h5.attrs["schema_version"] == 1 and h5.attrs["version"] == "0.2.0"  # the fixture is what it says
    bank = load_bank(OLD / "bank.h5")
    assert len(bank) == 6 and bank.image_shape == (1, 32, 32)
    assert bank.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert bank.task.name == "classification" and bank.attrs["task"] == "classification"
    assert bank.extra["teacher_logits"].shape == (6, 10)
    bank.check_compatible(INFO)  # feeds today's mnist5k students
    assert verify_bank(OLD / "bank.h5")["checksummed"]
    assert bank_info(OLD / "bank.h5")["n"] == 6


def test_a_schema_1_checkpoint_rebuilds_the_same_model() -> None:
    meta = read_meta(OLD / "student.safetensors")
    assert meta.version == "0.2.0" and meta.kind == "student" and meta.task.name == "classification"
    assert meta.metrics == {"test_acc": pytest.approx(0.9123)} and meta.headline == pytest.approx(0.9123)
    assert meta.dataset.image_size == (32, 32) and meta.dataset == INFO
    model, _ = load_model(OLD / "student.safetensors")
    io = load_file(str(OLD / "student_io.safetensors"))
    with torch.no_grad():  # the logits were written on another CPU model: its kernels round differently (~1e-8)
        torch.testing.assert_close(model(io["x"]), io["logits"], rtol=0, atol=1e-6)


def test_old_artifacts_work_in_the_stages(tmp_path: Path, cli: Any) -> None:
    info = cli("bank", "info", OLD / "bank.h5", "--json", tmp_path / "i.json")
    assert info.exit_code == 0, info.output
    assert json.loads((tmp_path / "i.json").read_text())["task"] == "classification"
    out = cli("export", OLD / "student.safetensors", "--format", "torchscript", "--out", tmp_path / "s.pt")
    assert out.exit_code == 0, out.output


def test_a_future_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    shutil.copy(OLD / "bank.h5", tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5", "a") as h5:
        h5.attrs["schema_version"] = 9
    with pytest.raises(DfkdError, match=r"bank schema version 9; this dfkd .* reads versions 1, 2"):
        load_bank(tmp_path / "b.h5")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(OLD / "student.safetensors"), "pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(md["dfkd"])
    meta["schema_version"] = 9
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={**md, "dfkd": json.dumps(meta)})
    with pytest.raises(DfkdError, match=r"checkpoint schema version 9; this dfkd reads versions 1, 2"):
        read_meta(tmp_path / "m.safetensors")
