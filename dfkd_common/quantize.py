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

**Fine-tuning** (``finetune.epochs`` > 0; for 4-bit weights, where calibration alone loses most): the model's
weights are fake-quantized exactly as ONNX Runtime will quantize them (:class:`FakeQuantWeight`, a
parametrization through ``torch.fake_quantize_per_channel_affine``, straight-through gradients), the inputs of
its convolutions and linear layers fake-quantized to uint8 at ranges calibrated once on the calibration images
(:class:`ActivationRanges`), and BatchNorm kept at its running statistics (they fold into the convolutions'
weights at export, and per-channel symmetric rounding is unchanged by that per-channel scaling). Then the model is
distilled from its own fp32 self on the bank by the student loop (KD, resumable per epoch), the fake
quantization removed, and the fine-tuned weights quantized as above.
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
from torch import nn
from torch.nn.utils import parametrize

from dfkd_common import __version__
from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import ModelMeta, file_checksum, now
from dfkd_common.data import ArraySplit, DatasetInfo, get_dataset
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.loops.distillation import Distillation

#: weight bits -> ONNX Runtime's quantized type name and the integer range its symmetric quantization uses
WEIGHT_RANGES: dict[int, tuple[str, int, int]] = {8: ("QInt8", -127, 127), 4: ("QInt4", -8, 7)}
CALIBRATIONS = ("bank", "real", "noise")
KIND = "quantized"
EXPORTER_OPSET = 17  # the fp32 export's (torch's legacy exporter, the one that folds BatchNorm, goes to 20)


@dataclass(frozen=True)
class Quantize:
    """``dfkd quantize``'s params (the ``quantize`` section: ``common`` and profiles, like every stage's)."""

    weight_bits: Literal[8, 4] = 8
    act_bits: Literal[8] = 8  # ONNX Runtime's int8 kernels take 8-bit activations
    per_channel: bool = True
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
        split = get_dataset(info.name).load("train", data_root, info.image_size)
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
    return Calibration(as_float(train[rows]), train, labels, described)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 rows as float in [0, 1]; float rows as they are."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


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


def frozen_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm at its running statistics whatever mode the model is put in: the quantized model
    folds them into its convolutions, so the fine-tuned one must compute with them too."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = (lambda self, mode=True: nn.Module.train(self, False)).__get__(m)  # type: ignore[method-assign]
            m.eval()


@contextlib.contextmanager
def fake_quantized(model: nn.Module, bits: int, images: torch.Tensor) -> Iterator[nn.Module]:
    """``model`` with fake-quantized weights and activations for the ``with`` block; on leaving, the fake
    quantization goes and the (fine-tuned) float weights stay, for ONNX Runtime to quantize."""
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
    with quiet_tracing():
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(out), dynamo=False, input_names=["images"],
                          output_names=["logits"], opset_version=min(opset, EXPORTER_OPSET),
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    if opset > EXPORTER_OPSET:  # the legacy exporter stops at 20; ONNX's converter takes the graph up
        onnx = need("onnx", "dfkd quantize")
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(out)), opset), str(out))


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
        quant_pre_process(str(fp32), str(prepared))
        weight_type = getattr(q.QuantType, WEIGHT_RANGES[cfg.weight_bits][0])
        q.quantize_static(str(prepared), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=cfg.per_channel, weight_type=weight_type,
                          activation_type=q.QuantType.QUInt8, calibrate_method=methods[cfg.method],
                          extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


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
    meta = ModelMeta.from_json(props["dfkd"])
    if meta.kind != KIND:
        raise DfkdError(f"{path} holds a {meta.kind!r} model, not a quantized one")
    return meta


class OnnxModel(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU behind torch's module interface, so that dfkd's evaluation
    measures it as any model (float images in [0, 1] in, logits out)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        ort = need("onnxruntime", "running a quantized model")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0])


def load_quantized(path: Path) -> tuple[OnnxModel, ModelMeta]:
    meta = read_quantized_meta(path)
    return OnnxModel(path), meta


def is_quantized(path: Path) -> bool:
    """Whether ``path`` names a quantized artifact (by its format: ONNX)."""
    return path.suffix.lower() == ".onnx"


# ------------------------------------------------------------------------------------------- the whole job
def quantized_meta(fp32: ModelMeta, source: Path, cfg: Quantize, calib: Calibration, kind: str,
                   metrics: dict[str, float], fp32_metrics: dict[str, float], machine: str) -> ModelMeta:
    """The artifact's metadata: the fp32 model's identity, the quantization, its calibration and its figures."""
    from dfkd_common.config import values

    ort = need("onnxruntime", "dfkd quantize")
    quant = {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "weights": "symmetric, per channel"
             if cfg.per_channel else "symmetric, per tensor", "activations": "uint8, asymmetric, per tensor",
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
    kind = "AMX-int8" if "amx_int8" in flags else "AVX512-VNNI" if "avx512_vnni" in flags else (
        "AVX-VNNI" if "avx_vnni" in flags else "no VNNI")
    return f"x86 {kind}" if flags else "unknown CPU"


def evaluate_quantized(path: Path, split: ArraySplit) -> dict[str, float]:
    """The quantized model's task metrics on ``split`` (fp32 logits out of ONNX Runtime)."""
    from dfkd_common.engine import Engine
    from dfkd_common.evaluation import evaluate

    return evaluate(OnnxModel(path), split, Engine.create("cpu", amp=False))


def check_out(out: Path) -> None:
    """``--out`` must name an ONNX file: the only format ``dfkd quantize`` writes (one line otherwise)."""
    if out.suffix.lower() != ".onnx":
        raise DfkdError(f"--out {out}: dfkd quantize writes an ONNX QDQ model; name it *.onnx")
