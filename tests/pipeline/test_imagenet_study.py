"""The ImageNet study (pipelines/imagenet-r50-r18): its settings are the published ones, its commands name what
the study needs, and its configs build and take one step at 224 px on a torchvision ResNet-50 (the study itself
is not run here: 140,000 images of 2,000 steps each are GPU-days)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from dfkd_common.data import DatasetInfo
from dfkd_common.engine import Engine
from dfkd_common.models import build_for
from dfkd_common.runs.student_run import resolve_run
from dfkd_common.synthesis import build_synthesizer

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "pipelines" / "imagenet-r50-r18"
sys.path.insert(0, str(ROOT))
from stages.synthesize import resolve_params  # noqa: E402 (the stage's own resolution of its params)

#: NVlabs/DeepInversion: imagenet_inversion.py's arguments as the README's command sets them (--r_feature 0.01,
#: --lr 0.25, --do_flip, jitter 30, setting_id 1 = 2k iterations at full resolution), deepinversion.py's Adam
#: (betas 0.5, 0.9) and first_bn_multiplier 10, tv_l2 1e-4, l2 1e-5, main_loss_multiplier 1; the paper's batch of
#: 152 and its 140k images.
PUBLISHED = {"batch_size": 152, "g_steps": 2000, "lr": 0.25, "betas": (0.5, 0.9), "images": 140_000,
             "weights": {"bn": 0.01, "oh": 1.0, "tv": 0.0001, "l2": 0.00001}, "first_bn": 10.0,
             "crop_pad": 30, "flip": True}


def test_deepinversion_runs_at_the_published_imagenet_settings() -> None:
    run, cfg = resolve_params(STUDY / "params.yaml", "deepinversion")
    assert (cfg.batch_size, cfg.g_steps, cfg.lr, tuple(cfg.betas)) == (
        PUBLISHED["batch_size"], PUBLISHED["g_steps"], PUBLISHED["lr"], PUBLISHED["betas"])
    assert abs(run.rounds * cfg.batch_size - PUBLISHED["images"]) < cfg.batch_size
    assert {k: v for k, v in cfg.weights.items() if v} == PUBLISHED["weights"]
    assert cfg.terms["bn"]["first"] == PUBLISHED["first_bn"]
    assert (cfg.augment.crop_pad, cfg.augment.flip) == (PUBLISHED["crop_pad"], PUBLISHED["flip"])


def test_the_students_stream_the_bank_and_are_measured_on_imagenet_val() -> None:
    for name, online in (("deepinversion", None), ("fast", "fast")):
        cfg = resolve_run(STUDY / "params.yaml", name, online=online)
        assert cfg.student == "torchvision:resnet18"
        assert cfg.stream.mode == "auto" and cfg.stream.above_mib * 2**20 < 140_000 * 3 * 224 * 224
    stages = yaml.safe_load((STUDY / "dvc.yaml").read_text())["stages"]
    teacher = stages["teacher"]["cmd"]
    assert "torchvision:resnet50" in teacher and "--image-size 224" in teacher and "--classes 1000" in teacher
    assert "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225" in teacher
    for stage in ("distill_deepinversion", "distill_fast"):
        assert "--test ${imagenet.val}" in stages[stage]["cmd"]
    assert "--bank artifacts/banks/deepinversion.h5" in stages["distill_deepinversion"]["cmd"]


def test_the_study_configs_take_a_step_on_a_resnet50_at_224() -> None:
    """One DeepInversion step of 2 images with the study's terms (the first-BN weight included)."""
    info = DatasetInfo("imagenet", 3, (224, 224), 1000, tuple(str(i) for i in range(1000)),
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.manual_seed(0)
    teacher = build_for("torchvision:resnet50", info).eval()
    _, cfg = resolve_params(STUDY / "params.yaml", "deepinversion", sets=["batch_size=2", "g_steps=1"])
    synth = build_synthesizer("deepinversion", teacher, info, cfg, Engine.create("cpu", amp=False), seed=0)
    result = synth.synthesize(0)
    assert result.images.shape == (2, 3, 224, 224) and torch.isfinite(result.images).all()
    student = build_for("torchvision:resnet18", info)
    assert student(result.images).shape == (2, 1000)
