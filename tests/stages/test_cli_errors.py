"""Bad input through the real CLI: one clear line on stderr, non-zero exit, no partial or clobbered artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import pytest
import torch

from dfkd_common.bank import BankWriter
from dfkd_common.data import get_dataset
from dfkd_common.errors import DfkdError

INFO = get_dataset("mnist5k").info


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_missing_checkpoint(tmp_path: Path, repo: Path, dfkd: Any, one_line_error: Any) -> None:
    proc = dfkd("synthesize", "-m", "dafl", "--teacher", str(tmp_path / "none.safetensors"),
                "--out", str(tmp_path / "b.h5"), cwd=repo)
    one_line_error(proc, "checkpoint not found")
    assert listing(tmp_path) == []


def test_truncated_checkpoint(tmp_path: Path, repo: Path, teacher_ckpt: Path, dfkd: Any, one_line_error: Any,
                              small_bank: Any) -> None:
    data = teacher_ckpt.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 3])
    proc = dfkd("distill", "--teacher", str(cut), "--bank", str(small_bank(tmp_path / "b.h5")),
                "--out", str(tmp_path / "s.safetensors"), cwd=repo)
    one_line_error(proc, "safetensors")
    assert "s.safetensors" not in listing(tmp_path)


def test_truncated_bank_and_other_schema(tmp_path: Path, repo: Path, teacher_ckpt: Path, dfkd: Any,
                                         one_line_error: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5", n=400)
    data = bank.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    proc = dfkd("distill", "--teacher", str(teacher_ckpt), "--bank", str(tmp_path / "cut.h5"),
                "--out", str(tmp_path / "s.safetensors"), cwd=repo)
    one_line_error(proc, "cut.h5")
    with h5py.File(bank, "a") as h5:
        h5.attrs["schema_version"] = 7
    proc = dfkd("bank", "info", str(bank), cwd=repo)
    one_line_error(proc, "schema version 7")
    assert not any(n.startswith("s.safetensors") for n in listing(tmp_path))


def test_bank_that_does_not_match_the_teacher(tmp_path: Path, repo: Path, teacher_ckpt: Path, dfkd: Any,
                                              one_line_error: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b28.h5", size=28)
    proc = dfkd("distill", "--teacher", str(teacher_ckpt), "--bank", str(bank),
                "--out", str(tmp_path / "s.safetensors"), cwd=repo)
    one_line_error(proc, "1x28x28")
    info100 = INFO.to_dict() | {"num_classes": 100}
    with BankWriter(tmp_path / "c100.h5", channels=1, image_size=32, kind="synthetic", method="t",
                    dataset=info100) as w:
        w.append(torch.rand(4, 1, 32, 32), [0, 1, 2, 3], 0)
    proc = dfkd("distill", "--teacher", str(teacher_ckpt), "--bank", str(tmp_path / "c100.h5"),
                "--out", str(tmp_path / "s.safetensors"), cwd=repo)
    one_line_error(proc, "100 classes")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher", "train", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["teacher", "train", "--arch", "nope"], "unknown model 'nope'"),
        (["synthesize", "-m", "nope", "--teacher", "x.safetensors"], "unknown synthesis method 'nope'"),
        (["distill", "--teacher", "x.safetensors", "--bank", "b.h5", "--set", "weights.nope=1"],
         "weights.nope: no such student term"),
    ],
)
def test_unknown_names(tmp_path: Path, repo: Path, args: list[str], message: str, dfkd: Any,
                       one_line_error: Any) -> None:
    proc = dfkd(*args, "--out", str(tmp_path / "out.bin"), cwd=repo)
    one_line_error(proc, message)
    assert listing(tmp_path) == []


def test_nan_loss_stops_without_clobbering_the_old_student(tmp_path: Path, repo: Path, teacher_ckpt: Path, dfkd: Any,
                                                           one_line_error: Any, small_bank: Any) -> None:
    bank = small_bank(tmp_path / "b.h5", n=256)
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"previous good student")
    proc = dfkd("distill", "--teacher", str(teacher_ckpt), "--bank", str(bank), "--out", str(out),
                "--epochs", "3", "--set", "lr=1e30", "--set", "weight_decay=0", cwd=repo)
    one_line_error(proc, "student loss became")
    assert out.read_bytes() == b"previous good student"
    assert not [n for n in listing(tmp_path) if n.endswith(".partial")]


def test_unknown_keys_are_one_error_line_not_ignored(tmp_path: Path) -> None:
    """`--set epoch=5`, or `--set distill.dfad.lr=0.1` (a params.yaml path, not a stage key), is an error; so is
    a typo in the params file's section, and a null where a value has no "default behaviour"."""
    from dataclasses import dataclass, field

    from dfkd_common.config import resolve

    @dataclass(frozen=True)
    class Stage:
        lr: float = 0.05
        epochs: int = 20
        online: dict[str, Any] = field(default_factory=dict)

    path = tmp_path / "p.yaml"
    path.write_text("s:\n  lr: 0.05\n  online: {ngf: 16}\n")
    out = resolve(Stage, path, "s", sets=["lr=0.1", "online.ngf=32"])
    assert out == Stage(lr=0.1, epochs=20, online={"ngf": 32})
    for bad, name in (("epoch=5", "epoch"), ("distill.dfad.lr=0.1", "distill")):
        with pytest.raises(DfkdError, match=rf"unknown param\(s\) {name} \(known: epochs, lr, online\)"):
            resolve(Stage, path, "s", sets=[bad])
    path.write_text("s:\n  epoch: 5\n")
    with pytest.raises(DfkdError, match="unknown param"):
        resolve(Stage, path, "s")
    path.write_text("s: {}\n")
    with pytest.raises(DfkdError, match="s: param epochs cannot be null"):
        resolve(Stage, path, "s", sets=["epochs=null"])


@pytest.mark.parametrize(("stage", "override", "pattern"), [
    ("distill", "lr=abc", "param lr must be a number"),
    ("distill", "online.ie=abc", "param ie must be a number"),
    ("cpnet", "online.g_steps=2.5", "param g_steps must be an integer"),
    ("cpnet", "online.weights.bn=x", "param weights.bn must be a number"),
    ("cpnet", "online.weights.bnn=1", "weights.bnn: no such loss term"),
    ("cpnet", "online.augment.crop_padd=2", "unknown param(s) crop_padd"),
    ("cpnet", "online.g_upsample=cubic", "param g_upsample must be one of nearest, bilinear"),
    ("cpnet", "online.g_width=0", "g_width must be >= 1"),
    ("synthesize", "rounds=many", "param rounds must be an integer"),
    ("synthesize", "amp=maybe", "param amp must be one of auto, true, false"),
    ("distill", "amp=1", "param amp must be one of auto, true, false"),
    ("distill", "online.amp=fast", "online.amp must be auto, true or false"),
    ("distill", "epoch=5", "distill: unknown param(s) epoch"),
    ("distill", "terms.kd.taux=4", "unknown param(s) terms.kd.taux"),
    ("synthesize", "gsteps=5", "dafl: unknown param(s) gsteps"),
])
def test_wrong_param_type_is_one_line(tmp_path: Path, repo: Path, teacher_ckpt: Path, stage: str, override: str,
                                      pattern: str, dfkd: Any, one_line_error: Any) -> None:
    """A mistyped value from params.yaml or --set is named in one line before any file is written."""
    if stage == "synthesize":
        args = ["synthesize", "-m", "dafl", "--out", str(tmp_path / "b.h5")]
    else:
        method = "cpnet" if stage == "cpnet" else "dfad"
        args = ["distill", "--name", method, "--online", method, "--out", str(tmp_path / "s.safetensors")]
    proc = dfkd(*args, "--teacher", str(teacher_ckpt), "--set", override, cwd=repo)
    one_line_error(proc, pattern)
    assert listing(tmp_path) == []
