"""``dfkd export``: the student (or any dfkd checkpoint) out of dfkd, for deployment.

``onnx`` and ``torchscript`` exports contain the input normalisation (they take images in [0, 1], N x C x H x W,
any batch size), so nothing about the dataset has to travel beside them. ``state_dict`` writes the inner network's
weights as a plain PyTorch file for PyTorch code that builds the same architecture itself, plus a JSON sidecar
(``FILE.json``) with the architecture, its options and the normalisation, which a state dict cannot hold.

Every export is checked before it is kept: the exported model is loaded back (ONNX Runtime for ONNX) and must
give the checkpoint's outputs on a batch of random images (max abs difference <= 1e-4 by default).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import typer

from dfkd_common.checkpoint import load_model
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import atomic_path, ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.geometry import shape_str
from dfkd_common.models import Classifier, build_for
from stages.common import console, errors

FORMATS = ("onnx", "torchscript", "state_dict")


def _check(name: str, expected: torch.Tensor, got: torch.Tensor, tolerance: float) -> float:
    diff = float((expected - got).abs().max())
    if not diff <= tolerance:
        raise DfkdError(f"the {name} export's outputs differ from the model's by {diff:.3g} (> {tolerance}); "
                        "not written")
    return diff


def export_onnx(model: Classifier, x: torch.Tensor, out: Path, tolerance: float, opset: int) -> float:
    need("onnx", "the onnx export")
    ort = need("onnxruntime", "checking the onnx export")
    with atomic_path(out, suffix=".onnx") as tmp:
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            diff = _check("onnx", model(x), got, tolerance)
    return diff


def export_torchscript(model: Classifier, x: torch.Tensor, out: Path, tolerance: float) -> float:
    with atomic_path(out, suffix=".pt") as tmp, torch.no_grad(), warnings.catch_warnings():
        # the trace fixes the input size (LeNet-5's padding test on it becomes a constant): that is the export
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(tmp))
        other = torch.rand(x.shape[0] + 1, *x.shape[1:], generator=torch.Generator().manual_seed(1))
        diff = max(_check("torchscript", model(x), loaded(x), tolerance),
                   _check("torchscript", model(other), loaded(other), tolerance))  # another batch size too
    return diff


def export_state_dict(model: Classifier, arch: str, arch_kwargs: dict, info: DatasetInfo, x: torch.Tensor,
                      out: Path, tolerance: float) -> float:
    with atomic_path(out, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=True)
        fresh = build_for(arch, info, arch_kwargs)
        fresh.net.load_state_dict(state)
        with torch.no_grad():
            diff = _check("state_dict", model(x), fresh.eval()(x), tolerance)
    sidecar = {"arch": arch, "arch_kwargs": arch_kwargs, "task": info.task, "input": list(info.shape),
               "num_classes": info.num_classes, "class_names": list(info.class_names),
               "mean": list(info.mean), "std": list(info.std),
               "note": "weights of the network alone: normalise images in [0, 1] with (x - mean) / std first"}
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return diff


@errors
def main(
    checkpoint: Path = typer.Argument(..., help="dfkd checkpoint (.safetensors) to export"),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | state_dict"),
    out: Path = typer.Option(..., "--out", help="file to write"),
    batch: int = typer.Option(4, "--batch", help="batch of random images the export is checked on"),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="largest output difference accepted"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
) -> None:
    """Export a checkpoint to ONNX / TorchScript (normalisation inside) or a plain state dict, checked against
    the model's own outputs before it is kept."""
    if fmt not in FORMATS:
        raise DfkdError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    ensure_writable(out)
    model, meta = load_model(checkpoint, "cpu")
    info = meta.dataset
    x = torch.rand(batch, *info.shape, generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        diff = export_onnx(model, x, out, tolerance, opset)
    elif fmt == "torchscript":
        diff = export_torchscript(model, x, out, tolerance)
    else:
        diff = export_state_dict(model, meta.arch, dict(meta.arch_kwargs), info, x, out, tolerance)
    console.print(f"{checkpoint} -> {out} ({fmt}; input {shape_str(info.channels, info.image_size)} in "
                  f"[0, 1]; outputs match the model's to {diff:.2g})")


if __name__ == "__main__":
    typer.run(main)
