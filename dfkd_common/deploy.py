"""A dfkd model out of dfkd, for deployment: ONNX, TorchScript or a plain state dict, each checked and described.

Why the resize is inside: a deployment has images as they come (MNIST's are 28x28; the mnist5k models were trained
on those digits resized bilinearly to 32x32), and a model fed another size either fails (an exported graph fixed
at 32x32) or quietly loses accuracy (LeNet-5 pads a 28x28 input itself, which is not how its training images were
made: 95.6 % against 97.3 % with the resize, on the real test digits). So the ONNX and TorchScript exports take
images in [0, 1], N x C x H x W, of any batch size *and any H, W*, and resize them to the size the model was
trained at (bilinear; antialiased in TorchScript; ONNX's legacy exporter has no antialiased resize, which changes
nothing when enlarging or at the trained size, and a large image is best shrunk with an antialiased resize before
it is given). At the trained size the resize is the identity, exactly. The normalisation is inside too.

``state_dict`` writes the inner network's weights for PyTorch code that builds the same architecture itself.

Every export is loaded back (ONNX Runtime for ONNX) and must give the model's outputs, at the trained size and at
two others, within a tolerance (1e-4 by default), before it is kept. Beside it goes a sidecar ``FILE.json``
(schema in ``docs/ARTIFACTS.md``): the input the export takes, what it does to it, and the classes it predicts.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.checkpoint import ModelMeta
from dfkd_common.engine import atomic_path
from dfkd_common.errors import DfkdError, first_line
from dfkd_common.extras import need
from dfkd_common.models import Classifier, build_for

FORMATS = ("onnx", "torchscript", "state_dict")


class Deployed(nn.Module):
    """``model`` behind a resize of any input to ``size`` (see the module docstring)."""

    def __init__(self, model: nn.Module, size: tuple[int, int], antialias: bool) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.antialias = antialias
        self.eval()  # an exporter puts a module back in the mode it found it in: eval, whole

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False,
                                antialias=self.antialias)
        return self.model(resized)


@dataclass(frozen=True)
class Exported:
    """What an export wrote and how closely it reproduces the model."""

    path: Path
    sidecar: Path
    max_diff: float
    input: dict[str, Any]


def probes(channels: int, size: tuple[int, int], batch: int) -> list[torch.Tensor]:
    """Random images the export is checked on: at the trained size, smaller (MNIST's 28 for 32) and larger."""
    h, w = size
    gen = torch.Generator().manual_seed(0)
    sizes = [(h, w), (max(1, h * 7 // 8), max(1, w * 7 // 8)), (h * 2, w * 3 // 2)]
    return [torch.rand(batch + i, channels, sh, sw, generator=gen) for i, (sh, sw) in enumerate(sizes)]


def _check(fmt: str, reference: Callable[[torch.Tensor], torch.Tensor],
           exported: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor], tolerance: float) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in xs:
            diff = float((reference(x) - exported(x)).abs().max())
            if not diff <= tolerance:
                raise DfkdError(f"the {fmt} export's outputs differ from the model's by {diff:.3g} (> {tolerance}) "
                                f"on {tuple(x.shape[2:])} images; not written")
            worst = max(worst, diff)
    return worst


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing warns that shape tests in a model's forward (LeNet-5's padding of small inputs) become constants:
    here they do by design (the resize in front always gives the trained size), so the warning says nothing
    true about the export; the legacy ONNX exporter's deprecation notice neither."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
        yield


def export_onnx(model: Classifier, size: tuple[int, int], xs: list[torch.Tensor], out: Path, tolerance: float,
                opset: int) -> float:
    need("onnx", "the onnx export")
    ort = need("onnxruntime", "checking the onnx export")
    deployed = Deployed(model, size, antialias=False)
    with atomic_path(out, suffix=".onnx") as tmp:
        with quiet_tracing():
            torch.onnx.export(deployed, (xs[0],), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["logits"], opset_version=opset,
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return _check("onnx", deployed, lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
                      xs, tolerance)


def export_torchscript(model: Classifier, size: tuple[int, int], xs: list[torch.Tensor], out: Path,
                       tolerance: float) -> float:
    deployed = Deployed(model, size, antialias=True)
    with atomic_path(out, suffix=".pt") as tmp, torch.no_grad(), quiet_tracing():
        torch.jit.save(torch.jit.trace(deployed, xs[0]), str(tmp))
        loaded = torch.jit.load(str(tmp))
        return _check("torchscript", deployed, loaded, xs, tolerance)


def export_state_dict(model: Classifier, meta: ModelMeta, xs: list[torch.Tensor], out: Path,
                      tolerance: float) -> float:
    with atomic_path(out, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, tmp)
        fresh = build_for(meta.arch, meta.dataset, dict(meta.arch_kwargs))
        fresh.net.load_state_dict(torch.load(tmp, map_location="cpu", weights_only=True))
        return _check("state_dict", model.eval(), fresh.eval(), xs[:1], tolerance)


def describe_input(fmt: str, meta: ModelMeta, size: tuple[int, int]) -> dict[str, Any]:
    """The input an export takes and what it does to it (the sidecar's ``input``); ``size``: the network's own."""
    info = meta.dataset
    h, w = size
    base = {"layout": "NCHW", "dtype": "float32", "channels": info.channels, "range": [0.0, 1.0],
            "trained_size": [h, w], "trained_on": info.name}
    if fmt == "state_dict":
        return {**base, "size": [h, w], "resize": f"yours, to {h}x{w} (bilinear, antialiased, as the training images "
                "were)", "antialias": True, "normalisation": "yours: (x - mean) / std per channel"}
    return {**base, "size": "any", "resize": f"inside, any HxW to {h}x{w} (bilinear; the identity at {h}x{w})",
            "antialias": fmt == "torchscript", "normalisation": "inside",
            **({} if fmt == "torchscript" else {"note": "ONNX's resize here is not antialiased: shrink images "
                                                "much larger than the model's input with an antialiased resize "
                                                "first"})}


def export(model: Classifier, meta: ModelMeta, source: Path, fmt: str, out: Path, batch: int = 4,
           tolerance: float = 1e-4, opset: int = 17) -> Exported:
    """Export ``model`` (its checkpoint ``source``, metadata ``meta``) as ``fmt`` to ``out``, checked, with its
    sidecar ``out.json``."""
    if fmt not in FORMATS:
        raise DfkdError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    info = meta.dataset
    own = getattr(model, "input_size", None)  # a student with its own input size: resized once, to that
    size = (int(own[0]), int(own[1])) if own else (int(info.image_size[0]), int(info.image_size[1]))
    xs = probes(info.channels, size, batch)
    model = model.eval()
    if fmt == "onnx":
        diff = export_onnx(model, size, xs, out, tolerance, opset)
    elif fmt == "torchscript":
        diff = export_torchscript(model, size, xs, out, tolerance)
    else:
        diff = export_state_dict(model, meta, xs, out, tolerance)
    described = describe_input(fmt, meta, size)
    side = write_sidecar(out, sidecar_record(fmt, source, meta, described, diff))
    return Exported(out, side, diff, described)


#: a quantized model's export against the model itself, at sizes other than its own: the resize in front is ONNX
#: Runtime's rather than torch's, and float rounding there can move an activation across an int8 step, so the
#: logits may differ by a few steps of the output's quantization; at the trained size they must be equal
INT8_TOLERANCE = 0.05


def _resize_front(size: tuple[int, int], probe: torch.Tensor, opset: int) -> Any:
    """ONNX's resize of any N x C x H x W to ``size`` alone, as an ONNX model at ``opset`` (written in memory)."""
    import io

    onnx = need("onnx", "exporting a quantized model")
    buffer = io.BytesIO()
    with quiet_tracing():
        torch.onnx.export(Deployed(nn.Identity(), size, antialias=False), (probe,), buffer, dynamo=False,
                          input_names=["images"], output_names=["resized"], opset_version=min(opset, 17),
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "resized": {0: "batch"}})
    return onnx.version_converter.convert_version(onnx.load_model_from_string(buffer.getvalue()), opset)


def sidecar_record(fmt: str, source: Path, meta: ModelMeta, described: dict[str, Any], diff: float,
                   **extra: Any) -> dict[str, Any]:
    """What an export's ``FILE.json`` says (docs/ARTIFACTS.md, "Exports")."""
    info = meta.dataset
    return {"format": fmt, "checkpoint": str(source), "kind": meta.kind, "arch": meta.arch,
            "arch_kwargs": dict(meta.arch_kwargs), "task": info.task, "input": described,
            "input_shape": list(info.shape), "num_classes": info.num_classes,
            "class_names": list(info.class_names), "mean": list(info.mean), "std": list(info.std),
            "outputs": "logits (N, num_classes)", "max_abs_diff": diff, **extra, "metrics": dict(meta.metrics)}


def write_sidecar(out: Path, record: dict[str, Any]) -> Path:
    side = out.with_name(out.name + ".json")
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return side


def export_quantized(source: Path, meta: ModelMeta, out: Path, batch: int = 4,
                     tolerance: float = INT8_TOLERANCE) -> Exported:
    """A quantized artifact (``dfkd quantize``'s ONNX QDQ model, its network's input size only) as a deployable
    int8 ONNX model: the same graph behind a resize of any H x W to that size, checked against the artifact
    (equal at its size; within ``tolerance`` x the logits' largest magnitude at two others), dfkd's metadata moved
    to the sidecar (the file is a deployment, not an artifact dfkd reads back), with its sidecar."""
    from dfkd_common.quantize import OnnxModel, net_shape

    onnx = need("onnx", "exporting a quantized model")
    channels, h, w = net_shape(meta)
    size = (h, w)
    quantized = onnx.load(str(source))
    opset = next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx"))
    xs = probes(channels, size, batch)
    with atomic_path(out, suffix=".onnx") as tmp:
        try:
            front = _resize_front(size, xs[0], opset)
            front.ir_version = quantized.ir_version
            del quantized.metadata_props[:]
            onnx.save(onnx.compose.merge_models(front, quantized, io_map=[("resized", "images")], prefix2="q_"),
                      str(tmp))
        except (RuntimeError, ValueError) as exc:  # onnx's compose and converter raise these
            why = first_line(exc, 200)
            raise DfkdError(f"{source}: the resize does not compose with the quantized graph ({why})") from None
        deployed, model = OnnxModel(tmp), OnnxModel(source)

        def reference(x: torch.Tensor) -> torch.Tensor:
            return model(F.interpolate(x, size=size, mode="bilinear", align_corners=False))

        with torch.no_grad():
            allowed = tolerance * max(float(reference(x).abs().max()) for x in xs[1:])
        worst = max(_check("int8 onnx", model, deployed, xs[:1], 1e-5),
                    _check("int8 onnx", reference, deployed, xs[1:], allowed))
    described = {**describe_input("onnx", meta, size), "int8": meta.params.get("quantization", {})}
    side = write_sidecar(out, sidecar_record(
        "onnx (int8 QDQ)", source, meta, described, worst,
        tolerance=f"equal at {h}x{w}; within {tolerance} x the logits' largest magnitude at other sizes"))
    return Exported(out, side, worst, described)
