"""Model sources: where a network's code comes from, by reference, and the one place that builds it.

A model reference names a source and a network in it: ``lenet5`` or ``zoo:lenet5`` (dfkd's zoo,
:mod:`dfkd_common.models.zoo`), ``torchvision:resnet18`` (torchvision's classification models, random weights),
``timm:resnet18`` (timm's, random weights), or the user's own code, ``package.module:Class`` or
``path/to/file.py:Class`` (:mod:`dfkd_common.models.user_code`: imported only when trusted). Every artifact
records its reference and options (``arch``, ``arch_kwargs``), and :func:`build_for` is how every stage and
:func:`dfkd_common.checkpoint.load_model` turn a reference plus a dataset description back into a network: wrapped in
:class:`~dfkd_common.models.zoo.Classifier` (the input normalisation travels with the model) and checked against
the input shape with one forward pass of zeros, so a network that cannot take the data is one error line before any
work starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from dfkd_common.data import DatasetInfo
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.geometry import Size, as_hw
from dfkd_common.models import user_code
from dfkd_common.models.zoo import MODELS, Classifier, InputRejected, check_input
from dfkd_common.registry import Registry


class ModelSource(ABC):
    """A registered source of networks (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        """The network ``name`` of this source, with random weights, for ``num_classes`` outputs."""


SOURCES: Registry[ModelSource] = Registry("model source")


def resolve(arch: str) -> tuple[ModelSource, str]:
    """``source:name`` -> (the source, the name); ``module:Class`` or ``file.py:Class`` -> user code and the whole
    reference; a bare name is the zoo's."""
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in SOURCES.names():
        return SOURCES.get(prefix), rest
    if user_code.parse(arch) is not None:
        return SOURCES.get("code"), arch
    return SOURCES.get("zoo"), arch


def build_model(arch: str, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float],
                image_size: Size | None = None, features: dict[str, Any] | None = None,
                input_size: Size | None = None, task: str = "classification", **kwargs: Any) -> Classifier:
    """The network ``arch`` (a model reference) behind its normalisation, checked against ``image_size`` if given;
    ``features``: feature sites named by module path, ``input_size``: the network's own input size where it
    differs from the data's (:class:`~dfkd_common.models.zoo.Classifier`).

    ``kwargs`` go to the network's constructor; one it does not take is one error line.
    """
    source, name = resolve(arch)
    try:
        net = source.build(name, num_classes, in_channels, **kwargs)
    except TypeError as exc:  # an arch_kwargs key the architecture does not take
        raise DfkdError(f"model {arch}: {exc}") from None
    model = Classifier(net, mean, std, num_classes, features, input_size)
    if features:
        check_feature_paths(model, arch)
    if image_size is not None:
        check_input(model, arch, in_channels, image_size, task)
    return model


def build_for(arch: str, info: DatasetInfo, kwargs: dict[str, Any] | None = None,
              features: dict[str, Any] | None = None, input_size: Size | None = None) -> Classifier:
    """The network ``arch`` for data described by ``info`` (classes, channels, normalisation, input size); with
    ``input_size``, a network that takes images of that size, the data's resized to it inside."""
    return build_model(arch, info.num_classes, info.channels, info.mean, info.std, image_size=info.image_size,
                       features=features, input_size=input_size, task=info.task, **(kwargs or {}))


def build_fitting(arch: str, info: DatasetInfo, sizes: Sequence[Size], kwargs: dict[str, Any] | None = None,
                  features: dict[str, Any] | None = None) -> tuple[Classifier, DatasetInfo]:
    """The network ``arch`` at the first of ``sizes`` it takes, and ``info`` at that size: a teacher's input
    geometry governs, so a network that takes only 28x28 digits gets mnist5k at 28 (its source size) rather than
    ever being fed 32x32 (see :meth:`~dfkd_common.data.datasets.DatasetSpec.load`). None taken: one error line."""
    reasons = []
    for size in sizes:
        try:
            return build_for(arch, info.at(size), kwargs, features), info.at(size)
        except InputRejected as exc:
            reasons.append(str(exc))
    tried = ", ".join(f"{h}x{w}" for h, w in (as_hw(s) for s in sizes))
    raise DfkdError(f"{reasons[-1] if len(sizes) == 1 else f'model {arch} takes none of the sizes {tried}'}; "
                    "give the size it takes with --image-size")


def check_feature_paths(model: Classifier, arch: str) -> None:
    """Every module path the user named for a feature exists in the network (one error line listing the
    candidates otherwise)."""
    names = dict(model.net.named_modules())
    named = model.feature_paths
    unknown_keys = sorted(set(named) - {"penultimate", "stages"})
    if unknown_keys:
        raise DfkdError(f"features.{unknown_keys[0]}: unknown (features take penultimate and stages)")
    paths = ([named["penultimate"]] if named.get("penultimate") else []) + list(named.get("stages") or [])
    for path in paths:
        if not isinstance(path, str) or path not in names:
            some = ", ".join(n for n in list(names)[1:13])
            raise DfkdError(f"model {arch} has no module {path!r} (its modules: {some}, ...)")


class Zoo(ModelSource):
    """dfkd's own architectures (:mod:`dfkd_common.models.zoo`): LeNet-5, CIFAR ResNets, WRNs, VGG-11-BN."""

    name = "zoo"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


class Torchvision(ModelSource):
    """torchvision's classification and segmentation models (``torchvision:NAME``), random weights (a backbone's
    too: nothing is downloaded); the import brings them. A segmentation model's dict output is reduced to its
    ``out`` logits by a forward hook, so its parameter names stay torchvision's (weights from a file load as
    saved), and its auxiliary head is left out."""

    name = "torchvision"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        from torchvision import models as tv_models

        segmentation = tv_models.list_models(module=tv_models.segmentation)
        if name not in tv_models.list_models(module=tv_models) and name not in segmentation:
            raise DfkdError(f"torchvision has no classification or segmentation model {name!r} (e.g. resnet18, "
                            "mobilenet_v2, vgg11_bn; deeplabv3_resnet50, lraspp_mobilenet_v3_large)")
        if in_channels != 3:
            raise DfkdError(f"torchvision:{name} takes 3-channel images, not {in_channels}")
        if name not in segmentation:
            return tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        kwargs = {"weights_backbone": None, "aux_loss": False, **kwargs}
        if name.startswith("lraspp"):
            kwargs.pop("aux_loss")
        net = tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        net.register_forward_hook(_segmentation_logits)
        return net


def _segmentation_logits(module: nn.Module, args: Any, out: Any) -> Any:
    """torchvision's segmentation models return ``{"out": logits, ...}``: the logits."""
    return out["out"] if isinstance(out, dict) else out


SOURCES.register("zoo")(Zoo())
SOURCES.register("torchvision")(Torchvision())


class Timm(ModelSource):
    """timm's models (``timm:NAME``), random weights: the import brings them (no hub download, ever)."""

    name = "timm"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        timm = need("timm", "timm models")
        if not timm.is_model(name):
            raise DfkdError(f"timm has no model {name!r} (timm.list_models() lists them, e.g. resnet18, "
                            "mobilenetv3_small_100, vit_tiny_patch16_224)")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


class UserCode(ModelSource):
    """The user's own ``nn.Module`` class by reference (see :mod:`dfkd_common.models.user_code`)."""

    name = "code"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        ref = user_code.parse(name)
        if ref is None:
            raise DfkdError(f"model {name!r}: expected package.module:Class or path/to/file.py:Class")
        return user_code.build(ref, num_classes, in_channels, **kwargs)


class TorchScript(ModelSource):
    """A TorchScript program (``torchscript:path/to/model.pt``), trusted like your own code: it carries its own
    program, and its weights come from the artifact. Hooks cannot reach its layers, so it serves the methods that
    read only a teacher's logits (:data:`~dfkd_common.models.hooks.LOGITS_ONLY`)."""

    name = "torchscript"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        if kwargs:
            raise DfkdError(f"torchscript:{name} takes no architecture options (got {', '.join(kwargs)})")
        return user_code.load_program(Path(name))


SOURCES.register("timm")(Timm())
SOURCES.register("torchscript")(TorchScript())
SOURCES.register("code")(UserCode())
