"""Integrity and bad input: corrupted banks and checkpoints are caught, unwritable outputs are one line, every zoo
model takes every registered dataset's input, and a work file is never deleted because it could not be opened."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from corrupt import flip_bank_byte

from dfkd_common.bank import load_bank, verify_bank
from dfkd_common.checkpoint import (
    ModelMeta,
    UnverifiedWarning,
    load_model,
    load_tree,
    now,
    save_model,
    save_tree,
)
from dfkd_common.data import DATASETS, get_dataset
from dfkd_common.errors import DfkdError
from dfkd_common.models import MODELS, build_model
from dfkd_common.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
INFO = get_dataset("mnist5k").info


def flip_tensor_byte(path: Path, tensor: str) -> None:
    """Flip one byte of a tensor's data in a safetensors file (header: u64 length, JSON, then the data)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def legacy_bank(path: Path, n: int = 32) -> Path:
    """A bank as dfkd 0.1 wrote it: the same schema, no checksum filter."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("images", data=np.random.default_rng(0).integers(0, 255, (n, 1, 32, 32), dtype=np.uint8),
                          chunks=(16, 1, 32, 32), maxshape=(None, 1, 32, 32))
        h5.create_dataset("labels", data=np.arange(n) % 10, maxshape=(None,))
        h5.create_dataset("round", data=np.zeros(n, np.int32), maxshape=(None,))
        for key, value in {"schema_version": 1, "kind": "synthetic", "method": "old", "params": "{}",
                           "dataset": json.dumps(INFO.to_dict()), "seed": 0, "teacher_checksum": "",
                           "parent_checksum": "", "created_at": "", "version": "0.1.0",
                           "source_names": "[]"}.items():
            h5.attrs[key] = value
    return path


# ----------------------------------------------------------------------------------------------------- banks
def test_a_flipped_byte_in_a_bank_is_one_line_naming_file_and_dataset(tmp_path: Path, teacher_ckpt: Path, dfkd: Any,
                                                                      one_line_error: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5", n=256)
    assert verify_bank(bank)["checksummed"]
    flip_bank_byte(bank)
    with pytest.raises(DfkdError, match=r"b\.h5: dataset 'images' fails its checksum"):
        load_bank(bank)
    # `bank info` reads no images (any bank size: issue 32); verify and training read them and fail
    assert dfkd("bank", "info", str(bank), cwd=ROOT).returncode == 0
    for args in (["bank", "verify", str(bank)],
                 ["distill", "--teacher", str(teacher_ckpt), "--bank", str(bank),
                  "--out", str(tmp_path / "s.safetensors")]):
        proc = dfkd(*args, cwd=ROOT)
        one_line_error(proc, "dataset 'images' fails its checksum")
        assert proc.returncode == 2
    assert not (tmp_path / "s.safetensors").exists()


def test_a_flipped_byte_in_the_labels_is_caught_too(tmp_path: Path, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5")
    flip_bank_byte(bank, "labels")
    with pytest.raises(DfkdError, match="dataset 'labels' fails its checksum"):
        verify_bank(bank)


def test_bank_verify_reports_a_good_bank(tmp_path: Path, dfkd: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5")
    proc = dfkd("bank", "verify", str(bank), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "OK, 64 rows" in proc.stdout and "images" in proc.stdout


def test_a_bank_written_before_checksums_opens_with_a_note(tmp_path: Path, dfkd: Any) -> None:
    bank = legacy_bank(tmp_path / "old.h5")
    with pytest.warns(UserWarning, match="cannot be verified"):
        loaded = load_bank(bank)
    assert len(loaded) == 32 and not loaded.checksummed
    proc = dfkd("bank", "verify", str(bank), cwd=ROOT)
    assert proc.returncode == 3 and "cannot be verified" in proc.stdout
    proc = dfkd("bank", "info", str(bank), cwd=ROOT)
    assert proc.returncode == 0
    assert proc.stderr.strip().startswith("note:") and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_flipped_byte_in_a_checkpoint_names_the_tensor(tmp_path: Path, teacher_ckpt: Path, dfkd: Any,
                                                         one_line_error: Any) -> None:
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(teacher_ckpt.read_bytes())
    flip_tensor_byte(bad, "net.fc.weight")
    with pytest.raises(DfkdError, match=r"tensor net\.fc\.weight does not match its recorded checksum"):
        load_model(bad)
    proc = dfkd("evaluate", str(bad), cwd=ROOT)
    one_line_error(proc, "net.fc.weight does not match")


def test_a_checkpoint_without_digests_loads_with_a_note(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_model("lenet5_half", 10, 1, INFO.mean, INFO.std)
    meta = ModelMeta("lenet5_half", {}, INFO, {}, {}, now(), "0.1.0", "student")
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"dfkd": meta.to_json()})  # digests None: the 0.1 format
    with pytest.warns(UnverifiedWarning, match="cannot be verified"):
        loaded, _ = load_model(path)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))


def test_a_saved_checkpoint_verifies_without_a_note(tmp_path: Path) -> None:
    model = build_model("lenet5_half", 10, 1, INFO.mean, INFO.std)
    path = tmp_path / "s.safetensors"
    save_model(path, model, ModelMeta("lenet5_half", {}, INFO, {}, {}, now(), "x", "student"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(path)


def test_a_corrupted_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_tree(path, {"w": torch.arange(64, dtype=torch.float32), "epoch": 3})
    assert load_tree(path)["epoch"] == 3
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DfkdError, match="does not match its recorded checksum"):
        load_tree(path)


# ---------------------------------------------------------------------------------------- unwritable outputs
def test_unwritable_outputs_are_one_line_naming_the_path(tmp_path: Path, teacher_ckpt: Path, dfkd: Any,
                                                         one_line_error: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cases = [
        (["bank", "grid", str(bank), "--out", "/proc/nope/x.png"], "/proc/nope/x.png"),
        (["bank", "grid", str(bank), "--out", str(blocker / "x.png")], "a_file/x.png"),
        (["bank", "info", str(bank), "--json", str(blocker / "i.json")], "a_file/i.json"),
        (["report", str(tmp_path / "m.json"), "--out-dir", str(blocker / "r")], "a_file/r"),
        (["evaluate", str(teacher_ckpt), "--metrics", str(blocker / "m.json")], "a_file/m.json"),
        (["teacher", "train", "--epochs", "1", "--out", str(blocker / "t.safetensors")], "a_file/t.safetensors"),
    ]
    (tmp_path / "m.json").write_text(json.dumps({"name": "x", "test_acc": 0.5}))
    for args, path in cases:
        one_line_error(dfkd(*args, cwd=ROOT), path)


# ----------------------------------------------------------------------------------------------------- zoo
def dataset_shapes(tmp_path: Path) -> dict[str, tuple[int, int, int, str]]:
    """(channels, size, classes, task) of every registered dataset from its metadata (no download, no data
    read)."""
    shapes = {}
    for name in DATASETS.names():
        if name == "imagefolder":  # its shape comes from its options; a root with two class folders
            for cls in ("cat", "dog"):
                (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            info = get_dataset(name, root=tmp_path).info
        else:
            info = get_dataset(name).info
        shapes[name] = (info.channels, info.image_size[0], info.num_classes, info.task)
    return shapes


def test_every_zoo_model_runs_forward_and_backward_on_every_dataset(tmp_path: Path) -> None:
    """Every zoo network on every registered dataset of its task (a network states a task other than
    classification as its ``task`` attribute: DeepLab's segmentation)."""
    shapes = dataset_shapes(tmp_path)
    assert {(1, 28, 10, "classification"), (1, 32, 10, "classification"), (3, 32, 10, "classification"),
            (3, 32, 100, "classification"), (1, 64, 11, "segmentation")} <= set(shapes.values())
    for arch in MODELS.names():
        task = getattr(MODELS.get(arch)(), "task", "classification")
        for name, (c, size, k, data_task) in shapes.items():
            if data_task != task:
                continue
            model = build_model(arch, k, c, (0.5,) * c, (0.25,) * c, image_size=size, task=task).train()
            logits = model(torch.rand(2, c, size, size))
            assert logits.shape == get_task(task).output_shape(2, k, (size, size)), (arch, name)
            logits.square().mean().backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad), (arch, name)


def test_lenet5_takes_28x28_as_lecun_did(tmp_path: Path) -> None:
    model = build_model("lenet5", 10, 1, (0.5,), (0.25,), image_size=28).eval()
    x = torch.zeros(1, 1, 28, 28)
    x[..., 10:18, 12:16] = 1.0
    padded = torch.zeros(1, 1, 32, 32)
    padded[..., 2:30, 2:30] = x
    assert torch.allclose(model(x), model(padded), atol=1e-6)  # a 28x28 digit is the same digit framed in 32x32


def test_a_real_shape_mismatch_is_one_line_before_any_work() -> None:
    with pytest.raises(DfkdError, match=r"model lenet5 cannot take 1x64x64 inputs"):
        build_model("lenet5", 10, 1, (0.5,), (0.25,), image_size=64)
    with pytest.raises(DfkdError, match=r"model lenet5: .*unexpected keyword"):
        build_model("lenet5", 10, 1, (0.5,), (0.25,), image_size=32, depth=3)


@pytest.mark.slow
def test_teacher_train_on_digits_with_the_default_arch_beats_chance(tmp_path: Path, dfkd: Any) -> None:
    out, metrics = tmp_path / "t.safetensors", tmp_path / "t.json"
    dfkd("teacher", "train", "--dataset", "digits", "--epochs", "4", "--out", out, "--metrics", metrics,
         cwd=tmp_path, check=True)  # no params.yaml here
    acc = json.loads(metrics.read_text())["test_acc"]
    assert acc > 0.7, acc  # 10 classes: chance is 0.1
    _, meta = load_model(out)
    assert meta.arch == "lenet5" and meta.dataset.image_size == (28, 28)
