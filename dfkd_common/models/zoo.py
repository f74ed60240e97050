"""Classifier zoo (registry) and the :class:`Classifier` wrapper every model is built in.

Every architecture is wrapped in :class:`Classifier`, which owns the input normalisation: all image tensors in
dfkd are in [0, 1] (generators end in a sigmoid/tanh rescale, banks store 0-255), and the model normalises
them itself. A checkpoint therefore carries its normalisation, and synthesis never has to know it.

Penultimate features and intermediate stages are reached by forward hooks addressed by module path
(:mod:`dfkd_common.models.hooks`), never by a custom ``forward``: the last ``nn.Linear`` in module order is
the classifier, and its input is the penultimate feature. Networks are built from a model reference by
:mod:`dfkd_common.models.sources` (the zoo here is one source; torchvision is another).

``lenet5`` follows DAFL/DFAD's LeNet-5 (conv 1->6->16->120, 5x5 kernels, 32x32 input, fc 120->84->C) with one
deliberate addition, on by default: a BatchNorm2d after each convolution. BN running statistics are the
main prior of DeepInversion, Fast, NAYER and CPNet (L_bn); a BN-free teacher would leave them nothing to
match. ``batchnorm=False`` gives the exact published network (DAFL and DFAD do not need BN). Smaller inputs are
padded to 32x32 the way LeCun fed it 28x28 MNIST (replicating the border, which is background on digits).

:func:`check_input` checks an architecture against the input shape with one forward pass of zeros (no random draw:
it must not move any seeded stream), so a model that cannot take a dataset's images is one error line naming both
before any work starts, not a conv2d traceback mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw, shape_str
from dfkd_common.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class Classifier(nn.Module):
    """``net`` behind a fixed input normalisation; input images are float in [0, 1].

    ``num_classes``: how many logits ``net`` makes (default: the last ``nn.Linear``'s outputs). ``features``: the
    feature sites the user named where discovery (:mod:`dfkd_common.models.hooks`) would guess wrong, as module
    paths inside ``net``: ``penultimate`` (a module whose output is the penultimate feature) and ``stages`` (the
    modules whose outputs are the stage maps). ``input_size``: a network's own input size where it differs from
    the data's (a student smaller than its teacher's images): images of another size are resized to it first
    (bilinear, antialiased), so the model takes the data's images like any other. All three travel in the
    model's checkpoint.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int | None = None,
                 features: dict[str, Any] | None = None, input_size: Size | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._num_classes = num_classes
        self.feature_paths: dict[str, Any] = dict(features or {})
        self.input_size = as_hw(input_size) if input_size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)

    @property
    def classifier(self) -> nn.Linear:
        """The last Linear layer making the logits: its input is the penultimate feature, its (W, b) the class
        hyperplanes. A network whose logits come from a functional call has none: an AttributeError (so that
        ``hasattr``, which tracers call on every attribute, says False instead of failing)."""
        last = None
        for m in self.net.modules():
            if isinstance(m, nn.Linear) and (self._num_classes is None or m.out_features == self._num_classes):
                last = m
        if last is None:
            raise AttributeError("model has no nn.Linear classifier")
        return last

    @property
    def num_classes(self) -> int:
        return self._num_classes if self._num_classes is not None else self.classifier.out_features


class InputRejected(DfkdError):
    """A network cannot take an input shape (:func:`check_input`)."""


@torch.no_grad()
def check_input(model: Classifier, arch: str, channels: int, image_size: Size, task: str = "classification") -> None:
    """One eval-mode forward of zeros: raise :class:`InputRejected` when ``model`` cannot take this input shape
    (a layer's shape error, or a network's own check of its input: an assertion, a ValueError) or does not map it
    to the logits ``task`` expects (classification: ``num_classes``; segmentation: ``num_classes`` per pixel)."""
    from dfkd_common.tasks import get_task

    expected = get_task(task).output_shape(2, model.num_classes, as_hw(image_size))
    was_training = model.training
    model.eval()
    shape = shape_str(channels, image_size)
    try:
        out = model(torch.zeros(2, channels, *as_hw(image_size)))
    except (RuntimeError, ValueError, AssertionError, IndexError, torch.jit.Error) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputRejected(f"model {arch} cannot take {shape} inputs ({reason})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        want = f"{model.num_classes} logits" if len(expected) == 2 else f"logits of shape {expected[1:]}"
        raise InputRejected(f"model {arch} maps {shape} inputs to {got}, not {want}")


# ----------------------------------------------------------------------------------------------- LeNet-5
class LeNet5(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], num_classes: int, in_channels: int, batchnorm: bool):
        super().__init__()
        c1, c2, c3, f1 = widths

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        self.features = nn.Sequential(block(in_channels, c1, True), block(c1, c2, True), block(c2, c3, False))
        self.fc1 = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < 32 or w < 32:  # LeCun's framing: 28x28 digits centred in a 32x32 field
            top, left = max(0, 32 - h) // 2, max(0, 32 - w) // 2
            x = F.pad(x, (left, max(0, 32 - w) - left, top, max(0, 32 - h) - top), mode="replicate")
        return self.fc(self.fc1(torch.flatten(self.features(x), 1)))


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True) -> nn.Module:
    return LeNet5((6, 16, 120, 84), num_classes, in_channels, batchnorm)


@MODELS.register("lenet5_half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True) -> nn.Module:
    return LeNet5((3, 8, 60, 42), num_classes, in_channels, batchnorm)


# ------------------------------------------------------------------------------------ CIFAR-style ResNets
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, four stages 64-128-256-512."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels)


# ----------------------------------------------------------------------------------- Wide ResNets (WRN-d-k)
class WideBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv) as in Zagoruyko & Komodakis."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            stage = []
            for j in range(n):
                stage.append(WideBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            blocks.append(nn.Sequential(*stage))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def make(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)

    return make


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"wrn_{_d}_{_k}")(_wrn(_d, _k))


# ------------------------------------------------------------------------------------------------ VGG-11-BN
class VGG(nn.Module):
    """The CIFAR VGG of the KD literature (RepDistiller's, used by CMI/Fast/NAYER/CPNet and DDA): five conv
    blocks (conv-BN-ReLU each), max-pooling after the first three, after the fourth only for inputs of 64 pixels
    or more (so a 32x32 input reaches the last block at 4x4), then global average pooling and one Linear.

    Convolutions carry no bias: BN follows each one, so a bias would be absorbed by BN's shift (an imported
    checkpoint with conv biases has them folded into BN's running mean, exactly).
    """

    def __init__(self, blocks: Sequence[Sequence[int]], num_classes: int, in_channels: int) -> None:
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(blocks):
            layers: list[nn.Module] = []
            for v in widths:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.depth = len(blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x.shape[-1] >= 64
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
            if i < 3 or (i == 3 and big):
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


@MODELS.register("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VGG(((64,), (128,), (256, 256), (512, 512), (512, 512)), num_classes, in_channels)


# ------------------------------------------------------------------------------ DeepLabV3-style segmentation
class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, 3x3 branches at ``rates``, and the image's
    mean broadcast back, concatenated and projected to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int]) -> None:
        super().__init__()

        def branch(k: int, rate: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=0 if k == 1 else rate, dilation=rate, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1, 1), *(branch(3, r) for r in rates)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabMini(nn.Module):
    """A CPU-sized DeepLabV3: a ResNet-style backbone of basic blocks to output stride 8 (three stride-2 stages,
    then a dilated one, as DeepLabV3's output stride 8), ASPP at rates 2 and 4 (DeepLabV3's 12, 24, 36 scaled to
    an 8x8 map of a 64x64 image), a 3x3 head and a 1x1 classifier, the logits upsampled bilinearly to the input.
    ``width`` sets every stage (the teacher 32, the thinner student 16). Not BN-free: DeepInversion and the
    relevance estimate read its BatchNorms."""

    #: the task it serves (a network without this attribute is a classifier)
    task = "segmentation"

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(w, w, 2)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.layer4 = BasicBlock(4 * w, 4 * w, 1, dilation=2)
        self.aspp = ASPP(4 * w, 2 * w, (2, 4))
        self.head = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        y = self.classifier(self.head(self.aspp(y)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


@MODELS.register("deeplab_mini")
def deeplab_mini(num_classes: int = 11, in_channels: int = 1, width: int = 32) -> nn.Module:
    return DeepLabMini(num_classes, in_channels, width)


@MODELS.register("deeplab_mini_half")
def deeplab_mini_half(num_classes: int = 11, in_channels: int = 1, width: int = 16) -> nn.Module:
    return DeepLabMini(num_classes, in_channels, width)

