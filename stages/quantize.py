"""``dfkd quantize``: a dfkd model as an int8 ONNX model, calibrated on banks (or real images, or noise), with
optional data-free fine-tuning (see :mod:`dfkd_common.quantize`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.engine import ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.runs.quantize_run import QuantizePaths, resolve_config, run
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors


@errors
def main(
    model: Path = typer.Option(..., "--model", help="the fp32 model to quantize: a dfkd checkpoint (teacher or "
                               "student)"),
    banks: list[Path] | None = typer.Option(None, "--bank", help="bank (.h5) to calibrate (and fine-tune) on; "
                                            "repeatable"),
    calibration: str | None = typer.Option(None, "--calibration", help="bank (default with --bank) | real (the "
                                           "dataset's training images) | noise (Gaussian): the references"),
    out: Path = typer.Option(..., "--out", help="quantized model to write: an ONNX QDQ model (*.onnx)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics JSON: test_acc and x_teacher (against "
                                        "the fp32 model)"),
    name: str | None = typer.Option(None, "--name", help="params profile under quantize: (e.g. w4a8_ft)"),
    weight_bits: int | None = typer.Option(None, "--weight-bits", help="8 or 4 (default: the params')"),
    finetune_epochs: int | None = typer.Option(None, "--finetune-epochs", help="epochs of data-free "
                                               "quantization-aware fine-tuning on the bank (0: calibration only)"),
    seed: int | None = typer.Option(None, help="seed (calibration rows, fine-tuning)"),
    test: Path | None = typer.Option(None, "--test", help="labelled test set (default: the model dataset's test "
                                     "split)"),
    data_root: Path | None = typer.Option(None, help="where the dataset's files are (default: ~/.cache/dfkd/data)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Quantize a model to int8 activations and 8- or 4-bit weights (post-training static quantization through
    ONNX Runtime), calibrated on bank images; with --finetune-epochs N, first distill the fake-quantized model
    from its fp32 self on the bank. Writes exactly --out, dfkd's metadata inside; `dfkd evaluate` and
    `dfkd export` take it."""
    sets = list(sets or [])
    if finetune_epochs is not None:
        sets.append(f"finetune.epochs={finetune_epochs}")
    cfg = resolve_config(params_file, name, sets, weight_bits=weight_bits, seed=seed)
    allow_code(trust_code, params_file)
    ensure_writable(out, metrics)
    kind = calibration or ("bank" if banks else "")
    if not kind:
        raise DfkdError("give --bank BANK (data-free) or --calibration real | noise")
    run(cfg, QuantizePaths(model, out, list(banks or []), metrics), kind, str(test) if test else None,
        str(data_root) if data_root else None, device, say=console.print)


if __name__ == "__main__":
    typer.run(main)
