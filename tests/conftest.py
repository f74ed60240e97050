"""Shared fixtures. Imports the torchvision guard first, like every entry point."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DFKD_NO_PROGRESS", "1")

from pathlib import Path

import pytest
import torch

from dfkd_common import __version__
from dfkd_common import tvguard as _tvguard  # noqa: F401
from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.checkpoint import ModelMeta, now, save_model
from dfkd_common.data import load_split
from dfkd_common.engine import Engine, seed_everything
from dfkd_common.loops.teacher_training import TeacherTraining, train_teacher
from dfkd_common.models import build_model

# OMP_NUM_THREADS (inherited by the CLI subprocesses too) picks another float path: the suite must hold at 1 and 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def mnist_test():
    return load_split("mnist5k", "test")


@pytest.fixture(scope="session")
def mnist_train():
    return load_split("mnist5k", "train")


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, mnist_train, mnist_test) -> Path:
    """A LeNet-5 (with BN) trained for a few epochs on mnist5k (~96-98 %); trained once per session."""
    seed_everything(0)
    info = mnist_train.info
    model = build_model("lenet5", 10, 1, info.mean, info.std)
    engine = Engine.create("cpu", amp=False)
    loop = TeacherTraining(epochs=6, batch_size=128, lr=0.05, optimizer="sgd", weight_decay=5e-4,
                           augment=AugmentConfig(crop_pad=2), seed=0)
    scores, _ = train_teacher(model, mnist_train, mnist_test, loop, engine)
    path = tmp_path_factory.mktemp("teacher") / "lenet5.safetensors"
    save_model(path, model, ModelMeta("lenet5", {}, info, scores, {}, now(), __version__, "teacher"))
    return path
