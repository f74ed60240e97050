"""Registries: every registered component builds, and unknown names fail with the list of known ones."""

from __future__ import annotations

import pytest
import torch

from dfkd_common.data import DATASETS, DatasetInfo
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.models import GENERATORS, MODELS, build_generator, build_model
from dfkd_common.models.hooks import BNStats, Penultimate
from dfkd_common.registry import Registry
from dfkd_common.student import STUDENT_TERMS
from dfkd_common.synthesis import SYNTHESIZERS, build_synthesizer
from dfkd_common.synthesis.losses import TERMS
from dfkd_common.variation.models import VARIATIONS

ZOO = ["lenet5", "lenet5_half", "resnet18", "resnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg11_bn"]


def test_registries_hold_the_documented_names() -> None:
    assert set(ZOO) <= set(MODELS.names())
    assert {"mnist5k", "digits", "mnist", "cifar10", "cifar100", "svhn", "imagefolder"} <= set(DATASETS.names())
    assert {"deepinversion", "dafl"} <= set(SYNTHESIZERS.names())
    assert {"bn", "oh", "ie", "act", "tv", "l2", "adv"} <= set(TERMS.names())
    assert {"kd", "ce", "l1", "na"} <= set(STUDENT_TERMS.names())
    assert "dcgan" in GENERATORS
    assert {"sdedit-prior", "sd-image-variations"} <= set(VARIATIONS.names())


@pytest.mark.parametrize("reg", [MODELS, DATASETS, SYNTHESIZERS, TERMS, STUDENT_TERMS, GENERATORS, VARIATIONS])
def test_unknown_name_is_a_clear_error(reg: Registry) -> None:
    with pytest.raises(DfkdError, match=r"unknown .*'nope'.*known: "):
        reg.get("nope")


def test_double_registration_is_refused() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError):
        reg.register("a")(2)


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_models_forward_and_expose_features(arch: str) -> None:
    channels = 1 if arch.startswith("lenet") else 3
    model = build_model(arch, 7, channels, (0.5,) * channels, (0.25,) * channels).eval()
    x = torch.rand(2, channels, 32, 32)
    with Penultimate(model) as hook:
        logits = model(x)
    assert logits.shape == (2, 7)
    assert hook.value.shape == (2, model.classifier.in_features)
    assert model.num_classes == 7
    # every zoo model has BatchNorm layers, so the BN-statistics prior applies to all of them
    assert len(BNStats(model)) > 0


def test_lenet5_matches_the_published_layout_without_bn() -> None:
    net = build_model("lenet5", 10, 1, (0.1,), (0.3,), batchnorm=False).net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(120, 84), (84, 10)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_dcgan_generator_shapes_and_range() -> None:
    g = build_generator("dcgan", nz=16, ngf=8, image_size=32, channels=3)
    with torch.no_grad():
        x = g(torch.randn(4, 16))
    assert x.shape == (4, 3, 32, 32)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


@pytest.mark.parametrize("method", sorted(SYNTHESIZERS.names()))
def test_every_synthesizer_rejects_a_misspelt_param(method: str) -> None:
    """A typo in a params.yaml method section must stop the stage, not silently run the method's defaults."""
    info = DatasetInfo("toy", 1, 32, 10, tuple(str(i) for i in range(10)), (0.5,), (0.25,))
    teacher = build_model("lenet5", 10, 1, info.mean, info.std)
    with pytest.raises(DfkdError, match=r"unknown param\(s\) gsteps"):
        build_synthesizer(method, teacher, info, {"gsteps": 5}, Engine.create("cpu"))
