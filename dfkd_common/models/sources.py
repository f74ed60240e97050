"""Model sources: where a network's code comes from, by reference, and the one place that builds it.

A model reference names a source and a network in it: ``lenet5`` or ``zoo:lenet5`` (dfkd's zoo,
:mod:`dfkd_common.models.zoo`), ``torchvision:resnet18`` (torchvision's classification models, random weights).
Later sources (timm, the user's own ``module:Class``) register here too. Every artifact records its reference and
options (``arch``, ``arch_kwargs``), and :func:`build_for` is how every stage and :func:`dfkd_common.checkpoint
.load_model` turns a reference plus a dataset description back into a network: wrapped in
:class:`~dfkd_common.models.zoo.Classifier` (the input normalisation travels with the model) and checked against
the input shape with one forward pass of zeros, so a network that cannot take the data is one error line before any
work starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import nn

from dfkd_common.data import DatasetInfo
from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size
from dfkd_common.models.zoo import MODELS, Classifier, check_input
from dfkd_common.registry import Registry


class ModelSource(ABC):
    """A registered source of networks (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        """The network ``name`` of this source, with random weights, for ``num_classes`` outputs."""


SOURCES: Registry[ModelSource] = Registry("model source")


def resolve(arch: str) -> tuple[ModelSource, str]:
    """``source:name`` -> (the source, the name); a bare name is the zoo's."""
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in SOURCES:
        return SOURCES.get(prefix), rest
    return SOURCES.get("zoo"), arch


def build_model(arch: str, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float],
                image_size: Size | None = None, **kwargs: Any) -> Classifier:
    """The network ``arch`` (a model reference) behind its normalisation, checked against ``image_size`` if given.

    ``kwargs`` go to the network's constructor; one it does not take is one error line.
    """
    source, name = resolve(arch)
    try:
        net = source.build(name, num_classes, in_channels, **kwargs)
    except TypeError as exc:  # an arch_kwargs key the architecture does not take
        raise DfkdError(f"model {arch}: {exc}") from None
    model = Classifier(net, mean, std)
    if image_size is not None:
        check_input(model, arch, in_channels, image_size)
    return model


def build_for(arch: str, info: DatasetInfo, kwargs: dict[str, Any] | None = None) -> Classifier:
    """The network ``arch`` for data described by ``info`` (classes, channels, normalisation, input size)."""
    return build_model(arch, info.num_classes, info.channels, info.mean, info.std, image_size=info.image_size,
                       **(kwargs or {}))


class Zoo(ModelSource):
    """dfkd's own architectures (:mod:`dfkd_common.models.zoo`): LeNet-5, CIFAR ResNets, WRNs, VGG-11-BN."""

    name = "zoo"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


class Torchvision(ModelSource):
    """torchvision's classification models (``torchvision:NAME``), random weights: the import brings them."""

    name = "torchvision"

    def build(self, name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
        from torchvision import models as tv_models

        if name not in tv_models.list_models(module=tv_models):
            raise DfkdError(f"torchvision has no classification model {name!r} (e.g. resnet18, resnet50, "
                            "mobilenet_v2, vgg11_bn)")
        if in_channels != 3:
            raise DfkdError(f"torchvision:{name} takes 3-channel images, not {in_channels}")
        return tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


SOURCES.register("zoo")(Zoo())
SOURCES.register("torchvision")(Torchvision())
