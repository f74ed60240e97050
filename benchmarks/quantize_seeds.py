"""Data-free quantization over bank seeds: the default teacher quantized from DeepInversion banks of 3 seeds.

For each seed: a DeepInversion bank (`dfkd synthesize --method deepinversion --seed S`, the default pipeline's
params), then `dfkd quantize` of the teacher W8A8 from the bank, from Gaussian noise and from the real training
images (the references, seeded alike), W4A8 from the bank, and W4A8 fine-tuned on the bank (profile w4a8_ft).
Prints each cell's mean +- sd over seeds on the real test split, and the paired differences that the acceptance
asks about (same seed, same teacher).

    python benchmarks/quantize_seeds.py [--seeds 0 1 2] [--teacher artifacts/teachers/lenet5.safetensors]
        [--out docs/data/quantize_seeds.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import DFKD, ROOT, machine

CELLS = {  # name: (quantize profile, calibration arguments; BANK is the seed's bank)
    "w8a8 bank": ("w8a8", ["--bank", "BANK"]),
    "w8a8 noise": ("w8a8", ["--calibration", "noise"]),
    "w8a8 real": ("w8a8", ["--calibration", "real"]),
    "w4a8 bank": ("w4a8", ["--bank", "BANK"]),
    "w4a8 bank + fine-tuning": ("w4a8_ft", ["--bank", "BANK"]),
}


def run(*args: object) -> None:
    subprocess.run([*DFKD, *map(str, args)], check=True, cwd=ROOT, capture_output=True, text=True)


def spread(values: list[float], signed: bool = False) -> str:
    """``mean +- sd`` over seeds (``signed``: a difference, written ``+0.41 +- 0.30``)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{'+' if signed else ''}.2f} +- {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher", type=Path, default=ROOT / "artifacts/teachers/lenet5.safetensors")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, dict[int, dict[str, float]]] = {cell: {} for cell in CELLS}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for seed in args.seeds:
            bank = tmp / f"di{seed}.h5"
            run("synthesize", "--method", "deepinversion", "--teacher", args.teacher,
                "--out", bank, "--seed", seed)
            for cell, (profile, calib) in CELLS.items():
                out = tmp / f"{cell.replace(' ', '_').replace('+', 'and')}-{seed}.onnx"
                metrics = out.with_suffix(".metrics.json")
                run("quantize", "--name", profile, "--model", args.teacher,
                    *[str(bank) if a == "BANK" else a for a in calib], "--out", out, "--metrics", metrics,
                    "--seed", seed)
                record = json.loads(metrics.read_text())
                details = json.loads(out.with_name(f"{out.stem}.details.json").read_text())
                results[cell][seed] = {"test_acc": 100 * record["test_acc"],
                                       "fp32_test_acc": 100 * details["fp32_test_acc"]}
                print(f"seed {seed} {cell}: {100 * record['test_acc']:.2f}", flush=True)
    fp32 = statistics.fmean(r["fp32_test_acc"] for r in results["w8a8 bank"].values())
    print(f"\nmachine: {machine()}; teacher fp32 {fp32:.2f} %; seeds {args.seeds}; real test split")
    print("| cell | accuracy (%) | - fp32 (points) |\n| --- | ---: | ---: |")
    for cell, by_seed in results.items():
        accs = [by_seed[s]["test_acc"] for s in args.seeds]
        print(f"| {cell} | {spread(accs)} | {spread([a - fp32 for a in accs], signed=True)} |")
    paired = {"noise - bank (W8A8)": ("w8a8 noise", "w8a8 bank"),
              "fine-tuned - calibrated (W4A8)": ("w4a8 bank + fine-tuning", "w4a8 bank")}
    for label, (a, b) in paired.items():
        diffs = [results[a][s]["test_acc"] - results[b][s]["test_acc"] for s in args.seeds]
        print(f"paired {label}: {spread(diffs, signed=True)} points")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "seeds": args.seeds, "fp32": fp32,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
