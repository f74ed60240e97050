"""Data-free quantization: a dfkd model as an int8 ONNX model (8- or 4-bit weights, 8-bit activations),
calibrated on bank images, optionally fine-tuned on them first.

**Why ONNX Runtime's static quantization** (and not torchao's PT2E flow, the other maintained one for torch 2.13):
its artifact, an ONNX QDQ model, is at once the library's own format and the deployable file (no pickle, no torch
needed to run it); its int8 kernels run without ``torch.compile`` (torchao's x86 quantizer is fast only compiled,
which needs a C++ toolchain at run time); it takes 4-bit weights (QDQ ``int4``) and per-channel weights; its
calibrators (min-max, entropy, percentile) are the ones the papers use. Measured on this project's CPUs
(``benchmarks/bench_quantize.py``, docs/RESULTS.md): int8 ONNX Runtime against ONNX Runtime fp32 and torch fp32.

**What a quantized model is**: the fp32 model exported to ONNX at its input size (normalisation inside, any batch),
ONNX Runtime's graph preparation, then ``quantize_static``: weights per output channel, symmetric (int8
[-127, 127], int4 [-8, 7]); activations uint8 per tensor, their ranges calibrated on the images given (banks,
the dataset's real training images, or Gaussian noise in the model's normalised input space: the two references
every data-free quantization paper reports). dfkd's metadata travels inside the file (``metadata_props["dfkd"]``,
a checkpoint's :class:`~dfkd_common.checkpoint.ModelMeta` of kind ``quantized``, schema in docs/ARTIFACTS.md).

**Fine-tuning** (``finetune.epochs`` > 0; for 4-bit weights, where calibration alone loses most): a copy of the
model has its BatchNorms folded into the convolutions that feed them (:func:`fold_batchnorm`: ONNX Runtime
quantizes the folded weights, and per-channel rounding is not invariant to the folding's scaling), its weights
fake-quantized exactly as ONNX Runtime will store them (:class:`FakeQuantWeight`, a parametrization,
straight-through gradients), the inputs of its convolutions and linear layers fake-quantized to uint8 at min-max
ranges calibrated once on the calibration images (:class:`ActivationRanges`). Then it is distilled from the fp32
model on the bank by the student loop (KD, resumable per epoch), the fake quantization removed, and the
fine-tuned weights quantized as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dfkd_common import __version__
from dfkd_common.augment_ops import AugmentConfig, to_float
from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import ModelMeta, file_checksum, now
from dfkd_common.data import DatasetInfo, get_dataset
from dfkd_common.errors import DfkdError, first_line
from dfkd_common.extras import need
from dfkd_common.loops.distillation import Distillation

#: weight bits -> ONNX Runtime's quantized type name and the integer range its symmetric quantization uses
WEIGHT_RANGES: dict[int, tuple[str, int, int]] = {8: ("QInt8", -127, 127), 4: ("QInt4", -8, 7)}
CALIBRATIONS = ("bank", "real", "noise")
KIND = "quantized"
EXPORTER_OPSET = 17  # the fp32 export's opset (torch's legacy exporter, the one that folds BatchNorm); then converted


@dataclass(frozen=True)
class Quantize:
    """``dfkd quantize``'s params (the ``quantize`` section: ``common`` and profiles, like every stage's)."""

    weight_bits: Literal[8, 4] = 8
    act_bits: Literal[8] = 8  # ONNX Runtime's int8 kernels take 8-bit activations
    method: Literal["minmax", "entropy", "percentile"] = "minmax"  # ONNX Runtime's calibrators
    calibration_images: int = 512  # at most this many rows, drawn at random (seeded) from the source
    seed: int = 0
    opset: int = 21  # of the quantized model (int4 QDQ needs 21; the fp32 export is converted up to it)
    # data-free QAT: the fake-quantized model distilled from its fp32 self on the bank (epochs 0: none)
    finetune: Distillation = field(default_factory=lambda: Distillation(
        epochs=0, batch_size=128, lr=1e-4, optimizer="adam", weight_decay=0.0,
        augment=AugmentConfig(crop_pad=2, flip=False)))


# ------------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """The images a quantization is calibrated (and fine-tuned) on: uint8 or float in [0, 1] (noise may leave it),
    with what they were, for the artifact's metadata."""

    images: torch.Tensor  # the calibration rows, float (N, C, H, W)
    train: torch.Tensor  # every row of the source (fine-tuning), uint8 or float
    labels: torch.Tensor
    described: list[dict[str, Any]]


def calibration(kind: str, banks: Sequence[Path], info: DatasetInfo, n: int, seed: int,
                data_root: str | None = None) -> Calibration:
    """The calibration set: ``bank`` (``banks``' rows, checked against the model's input), ``real`` (the
    dataset's training split) or ``noise`` (Gaussian in the model's normalised input space, as ZeroQ's baseline)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bank":
        if not banks:
            raise DfkdError("--calibration bank needs --bank")
        parts = [load_bank(b) for b in banks]
        for part in parts:
            part.check_compatible(info, "model")
        train = torch.cat([torch.as_tensor(p.images) for p in parts])
        labels = torch.cat([torch.as_tensor(p.labels) for p in parts]).long()
        described = [{"kind": "bank", "path": str(b), "sha256": file_checksum(b), "rows": len(p)}
                     for b, p in zip(banks, parts, strict=True)]
    elif banks:
        raise DfkdError(f"--calibration {kind} takes no --bank")
    elif kind == "real":
        same = {"image_size": info.image_size, "channels": info.channels} if info.name.startswith("imagefolder:") \
            else {}
        split = get_dataset(info.name, **same).load("train", data_root, info.image_size)
        train, labels = split.images, split.labels
        described = [{"kind": "real", "dataset": info.name, "split": "train", "rows": len(labels)}]
    elif kind == "noise":
        z = torch.randn(max(n, 1), *info.shape, generator=gen)
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        train, labels = mean + std * z, torch.zeros(z.shape[0], dtype=torch.long)
        described = [{"kind": "noise", "distribution": "N(0, 1) after the model's normalisation", "seed": seed}]
    else:
        raise DfkdError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, not {kind!r}")
    if len(train) == 0:
        raise DfkdError("the calibration source has no images")
    rows = torch.randperm(len(train), generator=gen)[:n].sort().values
    return Calibration(to_float(train[rows]).float(), train, labels, described)


def net_shape(meta: ModelMeta) -> tuple[int, int, int]:
    """(C, H, W) the network itself takes: its own input size where it has one (a student smaller than its
    teacher's images), else the data's. The quantized graph takes exactly that (the fp32 model's antialiased
    resize has no ONNX form); dfkd resizes images to it before they go in."""
    info = meta.dataset
    h, w = meta.input_size or info.image_size
    return (info.channels, int(h), int(w))


def fit(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Float images at ``shape``'s size: as they are, or resized as the fp32 model resizes them (bilinear,
    antialiased)."""
    if tuple(images.shape[-2:]) == shape[1:]:
        return images
    return F.interpolate(images.float(), size=shape[1:], mode="bilinear", align_corners=False, antialias=True)


# ------------------------------------------------------------------------------------------- fine-tuning
class FakeQuantWeight(nn.Module):
    """A weight as ONNX Runtime's symmetric per-channel quantization will store it (a parametrization).

    Scale = max |w| of the output channel x 2 / (qmax - qmin), computed in float64 and stored in float32, zero
    point 0, and q = round(w / scale) in float32, half to even, clipped: ``compute_scale_zp`` and
    ``quantize_nparray``'s arithmetic. Not torch's ``fake_quantize_per_channel_affine``: it multiplies by
    1 / scale, and with 4 bits every channel's extreme weight sits on a tie (max |w| / scale = 7.5), which the
    two round to different sides (-7 or -8) by a float's last bit. Straight-through gradient.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        _, self.qmin, self.qmax = WEIGHT_RANGES[bits]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
        scale = (absmax.double() * 2.0 / (self.qmax - self.qmin)).float()
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
        q = torch.round(w.detach().float() / scale).clamp_(self.qmin, self.qmax)
        return w + (q * scale - w).detach()


def quantizable(model: nn.Module) -> list[nn.Module]:
    """The layers ONNX Runtime quantizes the weights of: convolutions and linear layers."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


class ActivationRanges:
    """The inputs of the quantizable layers fake-quantized to uint8 (asymmetric, per tensor) at min-max ranges
    measured once on calibration images with the fp32 weights, as ONNX Runtime's min-max calibrator measures them."""

    def __init__(self, model: nn.Module, images: torch.Tensor, batch: int = 256) -> None:
        self.layers = quantizable(model)
        self.ranges: dict[int, tuple[float, float]] = {}
        observe = [m.register_forward_pre_hook(self._observe) for m in self.layers]
        try:
            with torch.no_grad():
                for i in range(0, len(images), batch):
                    model(images[i : i + batch])
        finally:
            for h in observe:
                h.remove()
        self.hooks = [m.register_forward_pre_hook(self._fake) for m in self.layers]

    def _observe(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        lo, hi = float(args[0].min()), float(args[0].max())
        old = self.ranges.get(id(module), (0.0, 0.0))  # the range always holds 0 (ONNX Runtime's rule)
        self.ranges[id(module)] = (min(old[0], lo), max(old[1], hi))

    def _fake(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        lo, hi = self.ranges[id(module)]
        scale = max((hi - lo) / 255.0, torch.finfo(torch.float32).tiny)
        zero = round(-lo / scale)
        return (torch.fake_quantize_per_tensor_affine(args[0], scale, zero, 0, 255), *args[1:])

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm that takes a convolution's output directly into that convolution, in place (the
    BatchNorm becomes an identity); returns how many were folded.

    Why: the ONNX export folds them so, and ONNX Runtime quantizes the folded weights w * gamma / sigma. Per-channel
    symmetric rounding is not invariant to that scaling (a negative gamma mirrors a channel onto the asymmetric
    4-bit range [-8, 7]; the scaling moves float ties), so the fine-tuning must see the folded weights to train
    through what will be stored. Which convolution feeds which BatchNorm is read off one forward pass (the
    BatchNorm's input *is* the convolution's output tensor), so any network's order of modules works."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors kept alive: no id is reused in the pass
    pairs: list[tuple[str, str]] = []
    names = {id(m): n for n, m in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def conv_out(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        outputs[id(out)] = (names[id(module)], out)

    def norm_in(module: nn.Module, args: tuple[Any, ...]) -> None:
        conv = outputs.get(id(args[0]))
        if conv is not None and conv[1] is args[0]:
            pairs.append((conv[0], names[id(module)]))

    hooks = [m.register_forward_hook(conv_out) for m in convs] + [m.register_forward_pre_hook(norm_in) for m in norms]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    counts: dict[str, int] = {}
    for conv, _ in pairs:
        counts[conv] = counts.get(conv, 0) + 1
    folded = 0
    for conv, norm in pairs:
        if counts[conv] == 1:  # a convolution feeding several BatchNorms stays as it is (the export leaves it)
            _replace(model, conv, fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(norm)))
            _replace(model, norm, nn.Identity())
            folded += 1
    return folded


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def frozen_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm left (those no convolution feeds directly: a pre-activation network's) at its running
    statistics whatever mode the model is put in: the quantized model computes with them so."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = (lambda self, mode=True: nn.Module.train(self, False)).__get__(m)  # type: ignore[method-assign]
            m.eval()


@contextlib.contextmanager
def fake_quantized(model: nn.Module, bits: int, images: torch.Tensor) -> Iterator[nn.Module]:
    """``model``, its BatchNorms folded into its convolutions (for good), with fake-quantized weights and
    activations for the ``with`` block; on leaving, the fake quantization goes and the (fine-tuned) float weights
    stay, for ONNX Runtime to quantize. Activation ranges: min-max, whatever calibrator the quantization uses."""
    fold_batchnorm(model, images[:2])
    frozen_batchnorm(model)
    acts = ActivationRanges(model.eval(), images)
    layers = quantizable(model)
    for m in layers:
        parametrize.register_parametrization(m, "weight", FakeQuantWeight(bits))
    try:
        yield model
    finally:
        acts.remove()
        for m in layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


# ------------------------------------------------------------------------------------------- the ONNX side
def export_float(model: nn.Module, shape: tuple[int, int, int], out: Path, opset: int) -> None:
    """The fp32 model as ONNX at its input shape, any batch, at ``opset`` (the legacy exporter: it folds
    BatchNorm in eval)."""
    from dfkd_common.deploy import quiet_tracing

    need("onnx", "dfkd quantize")
    try:
        with quiet_tracing():
            torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(out), dynamo=False,
                              input_names=["images"], output_names=["logits"],
                              opset_version=min(opset, EXPORTER_OPSET),
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        if opset > EXPORTER_OPSET:  # ONNX's converter takes the graph up to the quantized model's opset
            onnx = need("onnx", "dfkd quantize")
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(out)), opset), str(out))
    except (RuntimeError, ValueError) as exc:  # an operator the exporter or the converter has no form for
        raise DfkdError(f"the model does not export to ONNX: {first_line(exc, 200)}") from None


def quantize_onnx(model: nn.Module, shape: tuple[int, int, int], images: torch.Tensor, cfg: Quantize,
                  out: Path, batch: int = 64) -> None:
    """Write ``model`` quantized (``cfg``), calibrated on ``images``, to ``out`` (an ONNX QDQ model)."""
    need("onnxruntime", "dfkd quantize")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i : i + batch].numpy()} for i in range(0, len(images), batch)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="dfkd-quantize-") as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        export_float(model, shape, fp32, cfg.opset)
        weight_type = getattr(q.QuantType, WEIGHT_RANGES[cfg.weight_bits][0])
        try:
            quant_pre_process(str(fp32), str(prepared))
            q.quantize_static(str(prepared), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, weight_type=weight_type,
                              activation_type=q.QuantType.QUInt8, calibrate_method=methods[cfg.method],
                              extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        except Exception as exc:  # onnx / onnxruntime raise their own types for a graph they cannot take
            raise DfkdError(f"ONNX Runtime could not quantize the model: {first_line(exc, 200)}") from None


def write_meta(path: Path, meta: ModelMeta) -> None:
    """Put dfkd's metadata inside the ONNX file, as ``metadata_props["dfkd"]``."""
    onnx = need("onnx", "dfkd quantize")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    proto.metadata_props.add(key="dfkd", value=meta.to_json())
    onnx.save(proto, str(path))


def read_quantized_meta(path: Path) -> ModelMeta:
    """A quantized artifact's metadata (one error line for a file that is not one)."""
    onnx = need("onnx", "reading a quantized model")
    if not path.is_file():
        raise DfkdError(f"quantized model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises its own decode errors for damaged files
        raise DfkdError(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "dfkd" not in props:
        raise DfkdError(f"{path} is an ONNX model without dfkd metadata (not written by dfkd quantize)")
    try:
        meta = ModelMeta.from_json(props["dfkd"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DfkdError(f"{path}: its dfkd metadata is damaged ({first_line(exc, 200)})") from None
    if meta.kind != KIND:
        raise DfkdError(f"{path} holds a {meta.kind!r} model, not a quantized one")
    return meta


class OnnxModel(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU behind torch's module interface, so that dfkd's evaluation
    measures it as any model (float images in [0, 1] in, logits out); images are first brought to ``shape``
    (:func:`fit`) where one is given."""

    def __init__(self, path: Path, shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        ort = need("onnxruntime", "running a quantized model")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise DfkdError(f"{path}: ONNX Runtime cannot load it ({first_line(exc, 200)})") from None
        self.input = self.session.get_inputs()[0].name
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fit(x, self.shape) if self.shape else x
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0])


def load_quantized(path: Path) -> tuple[OnnxModel, ModelMeta]:
    meta = read_quantized_meta(path)
    return OnnxModel(path, net_shape(meta)), meta



def is_quantized(path: Path) -> bool:
    """Whether ``path`` names a quantized artifact (by its format: ONNX)."""
    return path.suffix.lower() == ".onnx"


# ------------------------------------------------------------------------------------------- the whole job
def quantized_meta(fp32: ModelMeta, source: Path, cfg: Quantize, calib: Calibration, kind: str,
                   metrics: dict[str, float], fp32_metrics: dict[str, float], machine: str) -> ModelMeta:
    """The artifact's metadata: the fp32 model's identity, the quantization, its calibration and its figures."""
    from dfkd_common.config import values

    ort = need("onnxruntime", "dfkd quantize")
    quant = {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "weights": "symmetric, per channel",
             "activations": "uint8, asymmetric, per tensor",
             "calibration": kind, "calibration_sources": calib.described, "calibration_rows": len(calib.images),
             "calibrate_method": cfg.method, "finetune_epochs": cfg.finetune.epochs,
             "runtime": f"onnxruntime {ort.__version__} (QDQ)", "machine": machine,
             "fp32": {"checkpoint": str(source), "sha256": file_checksum(source), "kind": fp32.kind,
                      "metrics": fp32_metrics}}
    return dataclasses.replace(fp32, metrics=metrics, params={"quantization": quant, "config": values(cfg)},
                               created_at=now(), version=__version__, kind=KIND, digests=None, code=None)


def machine_class() -> str:
    """The CPU's int8 class, which decides ONNX Runtime's int8 speed: AMX-int8, VNNI or neither."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "sse2" not in flags:  # not an x86 CPU, or no /proc/cpuinfo
        return "unknown CPU"
    return ("AMX-int8" if "amx_int8" in flags else "AVX512-VNNI" if "avx512_vnni" in flags else
            "AVX-VNNI" if "avx_vnni" in flags else "no VNNI")


def check(out: Path, cfg: Quantize) -> None:
    """What ``dfkd quantize`` cannot do, as one line before any work: ``--out`` other than ONNX (the only format
    it writes), 4-bit weights below opset 21, no calibration rows."""
    if out.suffix.lower() != ".onnx":
        raise DfkdError(f"--out {out}: dfkd quantize writes an ONNX QDQ model; name it *.onnx")
    if cfg.weight_bits == 4 and cfg.opset < 21:
        raise DfkdError(f"4-bit weights need opset 21 or later (quantize.opset is {cfg.opset})")
    if cfg.calibration_images < 1:
        raise DfkdError(f"quantize.calibration_images must be at least 1, not {cfg.calibration_images}")
