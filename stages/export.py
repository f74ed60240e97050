"""``dfkd export``: a dfkd checkpoint out of dfkd, for deployment (ONNX, TorchScript, a state dict; see
:mod:`dfkd_common.deploy`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.checkpoint import load_model
from dfkd_common.deploy import export, export_quantized
from dfkd_common.engine import ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.quantize import is_quantized, read_quantized_meta
from stages.common import TrustOpt, allow_code, console, errors


@errors
def main(
    checkpoint: Path = typer.Argument(..., help="dfkd checkpoint (.safetensors) or quantized model (.onnx, from dfkd "
                                      "quantize) to export"),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | state_dict"),
    out: Path = typer.Option(..., "--out", help="file to write (and its sidecar FILE.json)"),
    batch: int = typer.Option(4, "--batch", help="batch of random images the export is checked on"),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="largest output difference accepted (a quantized "
                                    "model: not used; equal at its size, 5 % of the logits' magnitude at others)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (a quantized model keeps its own)"),
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Export a checkpoint to ONNX or TorchScript (images in [0, 1] of any size: resize and normalisation inside)
    or a plain state dict, checked against the model's own outputs before it is kept; FILE.json beside it says
    what input it takes."""
    allow_code(trust_code)
    ensure_writable(out, out.with_name(out.name + ".json"))
    if is_quantized(checkpoint):  # dfkd quantize's ONNX model: deployable behind a resize, int8 as it is
        if fmt != "onnx":
            raise DfkdError(f"{checkpoint} is a quantized ONNX model: it exports as onnx only, not {fmt}")
        done = export_quantized(checkpoint, read_quantized_meta(checkpoint), out, batch)
    else:
        model, meta = load_model(checkpoint, "cpu")
        done = export(model, meta, checkpoint, fmt, out, batch, tolerance, opset)
    console.print(f"{checkpoint} -> {out} ({fmt}): takes N x {done.input['channels']} x H x W in [0, 1]; resize "
                  f"{done.input['resize']}; normalisation {done.input['normalisation']}; outputs match the model's "
                  f"to {done.max_diff:.2g}; input described in {done.sidecar}")


if __name__ == "__main__":
    typer.run(main)
