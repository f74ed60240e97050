"""Teachers from elsewhere: read a weights file safely, map its keys onto a zoo model, load it exactly.

Data-free distillation starts from someone else's trained classifier. The published teachers of the
CMI/Fast/NAYER/CPNet family (``checkpoints/pretrained/cifar10_resnet34.pth`` ...) and DFAD's LeNet-5 exist only
as PyTorch pickles, so this is the one place dfkd reads a pickle, and only through ``torch.load(weights_only=True)``,
PyTorch's restricted unpickler, which accepts tensors, containers and numbers and refuses anything that would run
code. Safetensors files are read as they are.

A **key map** (registered by name in :data:`KEYMAPS`, chosen with ``--keys``) turns the authors' parameter names
into the zoo's for each architecture it knows, states the architecture options their network needs (their
LeNet-5 has no BatchNorm) and the input normalisation they trained with (the CMI family's CIFAR-10 std is
(0.2023, 0.1994, 0.2010), not the dataset's true one). Where their layers differ from ours the map folds them
exactly: a convolution bias before a BatchNorm (their VGG) is absorbed into that BN's running mean. The name
lists were read from the authors' model files (``tests/fixtures/authors_keys.json`` holds them, tested against
these maps).

:func:`load_weights` then requires the converted keys and shapes to be exactly the model's: the first missing,
unexpected or wrongly shaped key (a wrong class count included) is one error line.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.registry import Registry

#: keys a training script may nest the state dict under
NESTED = ("state_dict", "model", "net", "model_state_dict", "student", "teacher")


@dataclass(frozen=True)
class KeyMap:
    """How one family of published checkpoints names its parameters, per zoo architecture."""

    name: str
    doc: str
    #: arch -> ordered (regex, replacement) rules applied to every key (first match wins)
    rules: Mapping[str, tuple[tuple[str, str], ...]]
    #: arch -> zoo options the authors' network corresponds to (e.g. LeNet-5 without BN)
    arch_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: dataset -> (mean, std) the authors normalised with, used unless --mean/--std are given
    normalisation: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    #: arch -> converts the whole renamed state dict (exact folds of layers ours lacks)
    fold: Mapping[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = field(default_factory=dict)

    def convert(self, arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if arch not in self.rules:
            raise DfkdError(f"key map {self.name} knows {', '.join(sorted(self.rules))}, not {arch}")
        rules = [(re.compile(a), b) for a, b in self.rules[arch]]
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            new = key
            for pattern, repl in rules:
                if pattern.fullmatch(key):
                    new = pattern.sub(repl, key)
                    break
            out[new] = value
        fold = self.fold.get(arch)
        return fold(out) if fold else out


KEYMAPS: Registry[KeyMap] = Registry("key map")


def fold_conv_bias_into_bn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``conv (bias b) -> BN`` equals ``conv (no bias) -> BN`` with ``running_mean - b``: for every ``P.i.bias``
    of a conv followed by the BN ``P.(i+1)``, subtract it from that BN's running mean and drop it."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".bias") and state[k].dim() == 1]:
        prefix, _, index = key[: -len(".bias")].rpartition(".")
        if not index.isdigit() or state.get(f"{key[:-5]}.weight", torch.zeros(0)).dim() != 4:
            continue  # not a conv inside a Sequential (a BN's or a Linear's bias)
        bn = f"{prefix}.{int(index) + 1}.running_mean" if prefix else f"{int(index) + 1}.running_mean"
        if bn in out:
            out[bn] = out[bn] - out.pop(key)
    return out


_CMI_NORMS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "mnist": ((0.1307,), (0.3081,)),
    "mnist5k": ((0.1307,), (0.3081,)),
}
_RESNET = ((r"linear\.(.*)", r"fc.\1"),)
_WRN = ((r"block(\d)\.layer\.(\d+)\.convShortcut\.(.*)", r"block\1.\2.shortcut.\3"),
        (r"block(\d)\.layer\.(\d+)\.(.*)", r"block\1.\2.\3"),
        (r"bn1\.(.*)", r"bn.\1"))
_LENET_SEQ = ((r"features\.0\.(.*)", r"features.0.0.\1"), (r"features\.3\.(.*)", r"features.1.0.\1"),
              (r"features\.6\.(.*)", r"features.2.0.\1"), (r"fc\.0\.(.*)", r"fc1.0.\1"), (r"fc\.2\.(.*)", r"fc.\1"))

KEYMAPS.register("cmi")(KeyMap(
    "cmi",
    "CMI / Fast / NAYER / CPNet (and DDA, RGAL) teachers, datafree/models/classifiers: CIFAR ResNet-18/34 "
    "(DAFL's), WRN-16/40-1/2, VGG-11-BN (RepDistiller's), LeNet-5 (DAFL's)",
    rules={"resnet18": _RESNET, "resnet34": _RESNET, "wrn_16_1": _WRN, "wrn_16_2": _WRN, "wrn_40_1": _WRN,
           "wrn_40_2": _WRN, "vgg11_bn": (), "lenet5": _LENET_SEQ, "lenet5_half": _LENET_SEQ},
    arch_kwargs={"lenet5": {"batchnorm": False}, "lenet5_half": {"batchnorm": False}},
    normalisation=_CMI_NORMS,
    fold={"vgg11_bn": fold_conv_bias_into_bn},
))
KEYMAPS.register("dfad")(KeyMap(
    "dfad",
    "DFAD (VainF/Data-Free-Adversarial-Distillation) network/lenet.py: LeNet-5 and LeNet-5-half",
    rules={arch: ((r"conv1\.(.*)", r"features.0.0.\1"), (r"conv2\.(.*)", r"features.1.0.\1"),
                  (r"conv3\.(.*)", r"features.2.0.\1"), (r"fc1\.(.*)", r"fc1.0.\1"), (r"fc2\.(.*)", r"fc.\1"))
           for arch in ("lenet5", "lenet5_half")},
    arch_kwargs={"lenet5": {"batchnorm": False}, "lenet5_half": {"batchnorm": False}},
    normalisation={"mnist": _CMI_NORMS["mnist"], "mnist5k": _CMI_NORMS["mnist"]},
))


#: what wrappers put in front of every key of a saved state dict: DataParallel/DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: safetensors, or a ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``.

    A checkpoint dict holding the state dict under one of :data:`NESTED` is unpacked; a ``module.`` prefix
    (``nn.DataParallel``, DDP) and an ``_orig_mod.`` prefix (``torch.compile``) are dropped, in any nesting; tensors
    saved on a GPU load on the CPU. A file whose pickle holds anything but weights is refused unread.
    """
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"weights file not found: {path}")
    if _is_torchscript(path):
        raise DfkdError(f"{path} is a TorchScript program, not a weights file: import it with --arch "
                        f"torchscript:{path} (it carries its own code, which runs once you allow it)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:
            raise DfkdError(f"{path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            code = next((ln for ln in lines if "GLOBAL" in ln), None)
            if code is None:  # torch's unpickler met no code, just bytes it cannot read: a damaged or foreign file
                detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
                raise DfkdError(f"{path} is not a readable PyTorch weights file ({detail})") from None
            raise DfkdError(f"{path} holds more than weights ({code}); dfkd reads pickles only through "
                            "torch.load(weights_only=True), which refused it, and nothing in it was run") from None
        except Exception as exc:  # truncated or not a torch file at all
            raise DfkdError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0]})") from None
    for _ in range(3):  # {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not _is_state(obj):
            inner = next((obj[k] for k in NESTED if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state(obj):
        raise DfkdError(f"{path} holds no state dict (a mapping of names to tensors, possibly under "
                        f"{' / '.join(NESTED)})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while state and stripped:  # saved from several GPUs (module.) or from torch.compile (_orig_mod.), or both
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip with the program's code, unlike ``torch.save``'s."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_state(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``net`` exactly: the first missing, unexpected or wrongly shaped key is one error line."""
    own = net.state_dict()
    for key, value in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):  # older checkpoints lack the BN step counter
                continue
            raise DfkdError(f"{what}: missing key {key} (expected {tuple(value.shape)}); the weights do not fit "
                            "this architecture (try --keys or --arch-kwargs)")
    for key, value in state.items():
        if key not in own:
            raise DfkdError(f"{what}: unexpected key {key}; the weights do not fit this architecture (try --keys)")
        if tuple(value.shape) != tuple(own[key].shape):
            hint = " (a different class count?)" if key.endswith((".weight", ".bias")) and value.dim() <= 2 else ""
            raise DfkdError(f"{what}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)}{hint}")
    net.load_state_dict({**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state})
