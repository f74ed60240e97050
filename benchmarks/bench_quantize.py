"""int8 against fp32: throughput and model size of `dfkd quantize`'s models, side by side in one run.

For the default pipeline's teacher (LeNet-5, 1x32x32) and a CIFAR-zoo network (WRN-16-2, 3x32x32, random
weights: speed does not depend on them), at batch 256, each model is run by

* torch eager fp32 (the model as dfkd trains it),
* ONNX Runtime fp32 (the same graph dfkd quantizes, unquantized),
* ONNX Runtime int8 (``dfkd quantize``'s W8A8 QDQ model; its Q/DQ pairs fuse into int8 kernels),
* ONNX Runtime W4A8 (4-bit weights stored as such; computed through dequantized float weights on the CPU),

all with the same threads, after a warm-up, median of ``--repeats`` timed passes. The machine class is printed
(AMX-int8, AVX512-VNNI or neither): int8 speed depends on it most.

``--torchao`` adds the library dfkd did not choose, measured the same way: torchao's PT2E flow (``torch.export``,
the x86 Inductor quantizer, calibrated on the same images, ``convert_pt2e``) run through ``torch.compile`` with
Inductor's freezing (how torchao's int8 is fast on a CPU), beside ``torch.compile`` of the fp32 model; the
compile time is reported apart (it needs a C++ compiler where the model runs). torchao is not a dfkd dependency:
``pip install --no-deps torchao``.

    python benchmarks/bench_quantize.py [--batch 256] [--repeats 20] [--threads 2] [--torchao]
        [--out docs/data/quantize_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, machine, teacher_or_untrained

from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.models import build_model
from dfkd_common.quantize import Quantize, export_float, machine_class, quantize_onnx


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torchao_runs(model: torch.nn.Module, x: torch.Tensor, calib: torch.Tensor) -> tuple[dict[str, Callable[[], object]],
                                                                                      dict[str, float]]:
    """torch.compile fp32, and torchao's PT2E int8 compiled: the calls to time, and each one's compile seconds."""
    import torch._inductor.config as inductor
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    inductor.freezing = True  # weights as constants: prepacked int8 weights
    runs: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for i in range(0, len(calib), 64):
            prepared(calib[i : i + 64])
        int8 = convert_pt2e(prepared)
        for label, module in (("torch.compile fp32", model), ("torchao int8 (PT2E, torch.compile)", int8)):
            compiled = torch.compile(module)
            t0 = time.perf_counter()
            compiled(x)
            compile_s[label] = time.perf_counter() - t0

            def call(compiled: Callable[[torch.Tensor], object] = compiled) -> object:
                with torch.no_grad():
                    return compiled(x)

            runs[label] = call
    return runs, compile_s


def measure(name: str, model: torch.nn.Module, shape: tuple[int, int, int], batch: int, repeats: int,
            threads: int, tmp: Path, with_torchao: bool = False) -> dict[str, object]:
    x = torch.rand(batch, *shape)
    calib = torch.rand(256, *shape)
    fp32_path, q8_path, q4_path = tmp / f"{name}.fp32.onnx", tmp / f"{name}.w8a8.onnx", tmp / f"{name}.w4a8.onnx"
    export_float(model, shape, fp32_path, Quantize().opset)
    quantize_onnx(model, shape, calib, Quantize(), q8_path)
    quantize_onnx(model, shape, calib, dataclasses.replace(Quantize(), weight_bits=4), q4_path)
    feeds = {"images": x.numpy()}
    runs: dict[str, Callable[[], object]] = {}
    model.eval()

    def eager() -> object:
        with torch.inference_mode():
            return model(x)

    runs["torch eager fp32"] = eager
    for label, path in (("onnxruntime fp32", fp32_path), ("onnxruntime int8 (W8A8)", q8_path),
                        ("onnxruntime W4A8", q4_path)):
        s = session(path, threads)
        runs[label] = lambda s=s: s.run(None, feeds)
    compile_s: dict[str, float] = {}
    if with_torchao:
        extra, compile_s = torchao_runs(model, x, calib)
        runs.update(extra)
    seconds = {label: timed(fn, repeats) for label, fn in runs.items()}
    rows = {label: {"images_per_s": batch / s, "seconds_per_batch": s} for label, s in seconds.items()}
    sizes = {"fp32 ONNX": fp32_path.stat().st_size, "W8A8 ONNX": q8_path.stat().st_size,
             "W4A8 ONNX": q4_path.stat().st_size}
    int8 = rows["onnxruntime int8 (W8A8)"]["images_per_s"]
    return {"model": name, "input": list(shape), "batch": batch, "runtimes": rows, "bytes": sizes,
            "compile_seconds": compile_s,
            "int8_vs_onnxruntime_fp32": int8 / rows["onnxruntime fp32"]["images_per_s"],
            "int8_vs_torch_eager_fp32": int8 / rows["torch eager fp32"]["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torchao", action="store_true", help="add torchao's PT2E int8 and torch.compile fp32")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher, _ = load_model(teacher_or_untrained(ROOT / "artifacts/teachers/lenet5.safetensors", tmp))
        info = get_dataset("cifar10").info
        wrn = build_model("wrn_16_2", 10, 3, info.mean, info.std)
        for name, model, shape in (("lenet5 (default teacher)", teacher, (1, 32, 32)),
                                   ("wrn_16_2 (CIFAR zoo)", wrn, (3, 32, 32))):
            results.append(measure(name, model, shape, args.batch, args.repeats, args.threads, tmp, args.torchao))
    record = {"machine": machine(), "int8_class": machine_class(), "threads": args.threads, "results": results}
    print(f"machine: {record['machine']}; {record['int8_class']}; {args.threads} threads, batch {args.batch}")
    for r in results:
        print(f"\n{r['model']}  input {'x'.join(map(str, r['input']))}")
        print(f"  {'runtime':<36} {'images/s':>10}")
        for label, row in r["runtimes"].items():
            print(f"  {label:<36} {row['images_per_s']:>10.0f}")
        print(f"  int8 vs onnxruntime fp32: {r['int8_vs_onnxruntime_fp32']:.2f}x; vs torch eager fp32: "
              f"{r['int8_vs_torch_eager_fp32']:.2f}x")
        print("  sizes: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in r["bytes"].items()))
        if r["compile_seconds"]:
            print("  compile: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["compile_seconds"].items()))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
