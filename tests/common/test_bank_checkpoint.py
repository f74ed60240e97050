"""ImageBank and checkpoint artifacts: round trips, atomic writes, validation, resumable state."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from dfkd_common import __version__
from dfkd_common.bank import BankWriter, bank_info, load_bank
from dfkd_common.checkpoint import ModelMeta, load_model, load_tree, now, read_meta, save_model, save_tree
from dfkd_common.data import get_dataset
from dfkd_common.engine import rng_state, set_rng_state
from dfkd_common.errors import DfkdError
from dfkd_common.models import build_model

INFO = get_dataset("mnist5k").info
#: the banks these tests write: two rounds of 20 images, with params and a seed to read back
TEST_BANK = {"n": 20, "rounds": 2, "method": "test", "params": {"a": 1}, "seed": 3}


def test_bank_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "b.h5"
    imgs = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    with BankWriter(path, channels=1, image_size=32, kind="retrieved", method="m", dataset=INFO.to_dict(),
                    optional=("score", "teacher_logits"), teacher_checksum="abc") as w:
        w.append(imgs, [1, 2, 3, 4, 5], 0, score=np.arange(5), teacher_logits=torch.randn(5, 10))
    bank = load_bank(path)
    assert torch.equal(bank.images, imgs)
    assert bank.labels.tolist() == [1, 2, 3, 4, 5]
    assert bank.extra["score"].tolist() == [0, 1, 2, 3, 4]
    assert bank.extra["teacher_logits"].dtype == torch.float16
    assert bank.attrs["schema_version"] == 2 and bank.attrs["kind"] == "retrieved"
    assert bank.attrs["task"] == "classification"
    assert bank.attrs["teacher_checksum"] == "abc" and bank.attrs["dataset"]["num_classes"] == 10
    assert "committed" not in bank.attrs
    with h5py.File(path) as h5:  # stored unnormalised, chunked, uncompressed, resizable
        assert h5["images"].chunks is not None and h5["images"].compression is None
        assert h5["images"].maxshape[0] is None


def test_float_images_are_quantised_from_unit_range(tmp_path: Path) -> None:
    path = tmp_path / "b.h5"
    with BankWriter(path, channels=1, image_size=32, kind="synthetic", method="m", dataset=INFO.to_dict()) as w:
        w.append(torch.full((2, 1, 32, 32), 0.5), [0, 1], 0)
        w.append(torch.full((1, 1, 32, 32), 2.0), [2], 1)  # out of range: clipped, not wrapped
    bank = load_bank(path)
    assert int(bank.images[0].max()) == 128 and int(bank.images[2].min()) == 255


def test_failed_writer_leaves_no_file_and_keeps_old_bank(tmp_path: Path, small_bank: Any) -> None:
    path = tmp_path / "b.h5"
    small_bank(path, **TEST_BANK)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with BankWriter(path, channels=1, image_size=32, kind="synthetic", method="m", dataset=INFO.to_dict()) as w:
            w.append(torch.rand(3, 1, 32, 32), [0, 1, 2], 0)
            raise RuntimeError("killed")
    assert path.read_bytes() == before  # the good bank survives a failed re-run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5"]  # and nothing half-written is left


def test_wrong_schema_version_is_refused(tmp_path: Path, small_bank: Any) -> None:
    path = tmp_path / "b.h5"
    small_bank(path, **TEST_BANK)
    with h5py.File(path, "a") as h5:
        h5.attrs["schema_version"] = 3  # a version this dfkd does not know: one line that says so
    with pytest.raises(DfkdError, match=r"schema version 3; this dfkd .* reads versions 1, 2"):
        load_bank(path)


def test_truncated_and_foreign_files_are_refused(tmp_path: Path, small_bank: Any) -> None:
    path = tmp_path / "b.h5"
    small_bank(path, **(TEST_BANK | {"n": 200}))
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DfkdError, match=r"truncated|unreadable"):
        load_bank(tmp_path / "cut.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DfkdError, match="not a readable HDF5"):
        bank_info(tmp_path / "text.h5")
    with pytest.raises(DfkdError, match="not found"):
        load_bank(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "rows.h5", "w") as h5:
        h5.create_dataset("images", data=np.zeros((3, 1, 4, 4), np.uint8))
        h5.create_dataset("labels", data=np.zeros(2, np.int64))
        h5.create_dataset("round", data=np.zeros(3, np.int32))
        h5.attrs["schema_version"] = 1
    with pytest.raises(DfkdError, match="'labels' has 2 rows"):
        load_bank(tmp_path / "rows.h5")


def test_bank_compatibility_with_teacher(tmp_path: Path, small_bank: Any) -> None:
    path = tmp_path / "b.h5"
    small_bank(path, **TEST_BANK)
    bank = load_bank(path)
    bank.check_compatible(INFO)
    with pytest.raises(DfkdError, match=r"1x32x32.*3x32x32"):
        bank.check_compatible(dataclasses.replace(INFO, channels=3))
    with pytest.raises(DfkdError, match=r"1x32x32.*1x32x48"):  # geometry is (H, W): a wider input is refused
        bank.check_compatible(dataclasses.replace(INFO, image_size=(32, 48)))
    with pytest.raises(DfkdError, match=r"10 classes.*100"):
        bank.check_compatible(dataclasses.replace(INFO, num_classes=100))


def test_checkpoint_rebuilds_model_from_file_alone(tmp_path: Path) -> None:
    model = build_model("lenet5_half", 10, 1, INFO.mean, INFO.std).eval()
    meta = ModelMeta("lenet5_half", {}, INFO, {"test_acc": 0.5}, {"lr": 0.1}, now(), __version__, "student")
    save_model(tmp_path / "m.safetensors", model, meta)
    loaded, meta2 = load_model(tmp_path / "m.safetensors")
    x = torch.rand(3, 1, 32, 32)
    assert torch.allclose(loaded(x), model(x))
    assert meta2.arch == "lenet5_half" and meta2.headline == 0.5 and meta2.dataset == INFO
    assert meta2.params == {"lr": 0.1}
    md = json.loads(__import__("safetensors").safe_open(str(tmp_path / "m.safetensors"), "pt").metadata()["dfkd"])
    assert md["input_shape"] == [1, 32, 32] and md["num_classes"] == 10 and md["version"] == __version__


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    model = build_model("lenet5", 10, 1, INFO.mean, INFO.std)
    save_model(tmp_path / "m.safetensors", model, ModelMeta("lenet5", {}, INFO, {}, {}, now(), "x", "teacher"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(DfkdError):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(DfkdError, match="not found"):
        read_meta(tmp_path / "nope.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DfkdError, match="not a readable safetensors"):
        load_model(tmp_path / "pickle.safetensors")


def test_state_tree_round_trips_optimizer_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": rng_state(), "n": 3, "t": (1, "a"), "none": None}
    save_tree(tmp_path / "s.safetensors", state)
    back = load_tree(tmp_path / "s.safetensors")
    assert back["n"] == 3 and back["t"] == (1, "a") and back["none"] is None
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(back["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
