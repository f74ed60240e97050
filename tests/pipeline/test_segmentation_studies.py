"""The segmentation studies: the GPU folders hold DFAD's released segmentation recipe (checked against the published
values in ../shared/METHODS.md, "DFAD"), and every params section resolves through dfkd's own configs, so a
`dvc repro` there fails on nothing but the data it needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dfkd_common.runs.student_run import resolve_run

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = {"camvid": {"weight_decay": 5e-4, "classes": 11}, "nyuv2": {"weight_decay": 5e-5, "classes": 13}}


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_the_gpu_study_holds_the_released_recipe(dataset: str) -> None:
    folder = ROOT / "pipelines" / f"segmentation-{dataset}"
    params = folder / "params.yaml"
    dfad = resolve_run(params, "dfad", online="dfad")
    assert dfad.batch_size == 64 and dfad.epochs == 300
    assert dfad.optimizer == "sgd" and dfad.lr == 0.1 and dfad.eta_min == 0.1  # constant, as published
    assert dfad.weight_decay == PUBLISHED[dataset]["weight_decay"]
    assert dfad.weights == {"kd": 0.0, "l1": 1.0}
    online = dfad.online
    assert online["nz"] == 256 and online["lr_g"] == 1e-3 and online["student_steps"] == 5
    assert online["iterations"] == 50 and online["g_loss"] == "log" and online["g_schedule"] == "constant"
    teacher = yaml.safe_load(params.read_text())["teacher"]
    assert teacher["arch"] == "torchvision:deeplabv3_resnet50" and teacher["dataset"] == dataset
    from dfkd_common.data import get_dataset

    info = get_dataset(dataset).info
    assert info.num_classes == PUBLISHED[dataset]["classes"] and info.image_size == (128, 128)  # the generator's
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert {"teacher", "real_bank", "distill_kd_real", "distill_dfad"} <= set(stages)
    assert resolve_run(params, "kd_real").student == dfad.student == "torchvision:deeplabv3_mobilenet_v3_large"


def test_the_offline_study_resolves_and_fits_its_budget() -> None:
    """pipelines/segmentation-mnist5k: every student profile resolves; DFAD keeps the published structure
    (5 student steps per generator step, L1 on per-pixel logits, the log generator loss by default)."""
    params = ROOT / "pipelines" / "segmentation-mnist5k" / "params.yaml"
    for name in ("deepinversion", "dafl", "kd_real"):
        run = resolve_run(params, name)
        assert run.student == "deeplab_mini_half" and run.terms["kd"]["tau"] == 1.0  # tau 4 halves KD's mIoU
    study = yaml.safe_load(params.read_text())
    assert {"deepinversion", "dafl"} <= set(study["synthesize"])
    dfad = resolve_run(params, "dfad", online="dfad")
    assert dfad.weights == {"kd": 0.0, "l1": 1.0} and dfad.online["student_steps"] == 5
    assert yaml.safe_load(params.read_text())["teacher"]["dataset"] == "mnist5k-seg"
