"""Throughput of the variation models: the tiny Stable Diffusion image-variation pipeline per dtype, and the prior.

The SD pipeline is the published architecture at toy widths, randomly initialised and built from configs
(``dfkd_common/variation/tiny.py``): nothing is downloaded. It measures the code path's speed and how bf16/fp16
compare with fp32 on the device, not image quality. One pipeline call per batch of ``--batch`` sources with k
variations each, as ``dfkd augment`` makes them.

    python benchmarks/bench_variation_speed.py --tiny                      # CPU smoke run (CI)
    python benchmarks/bench_variation_speed.py --device cuda --dtypes fp32,bf16,fp16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import dfkd_common  # noqa: F401  (torchvision guard first)
from dfkd_common.variation.models import open_variation_model
from dfkd_common.variation.tiny import build_tiny_sd_variation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(vm: object, x: torch.Tensor, k: int, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Variations per second over ``repeats`` calls after one untimed warm-up call."""
    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(x.shape[0] * k)]

    out = vm.vary(x, k, gens())  # type: ignore[attr-defined]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = vm.vary(x, k, gens())  # type: ignore[attr-defined]
    sync(device)
    return repeats * x.shape[0] * k / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=64, help="source images per pipeline call")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sample-size", type=int, default=32, help="latent size of the tiny UNet (output: 2x)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prior", type=Path, default=Path("priors/offline-pool-32x1"))
    ap.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke settings")
    args = ap.parse_args()
    if args.tiny:
        args.batch, args.k, args.steps, args.sample_size, args.repeats = 2, 2, 2, 16, 1
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    x = torch.rand(args.batch, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd_variation(Path(tmp) / "tiny-sd", sample_size=args.sample_size)
        ref = None
        for dt in args.dtypes.split(","):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            vm = open_variation_model(str(model), device, {"steps": args.steps, "dtype": dt})
            rate, out = timed(vm, x, args.k, args.repeats, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            first = args.dtypes.split(",")[0]
            diff = "" if ref is None else f", mean |diff| vs {first} {float((out - ref).abs().mean()):.4f}"
            ref = out if ref is None else ref
            print(f"tiny sd-image-variations {dt}: {rate:.1f} variations/s ({args.batch} sources x k {args.k}, "
                  f"{args.steps} steps, {vm.size}px out), peak GPU memory {peak:.0f} MiB{diff}")
            del vm
    if args.prior.is_dir():
        vm = open_variation_model(str(args.prior), device, {"strength": 0.5, "steps": 10})
        gray = torch.rand(max(args.batch, 4) * (1 if args.tiny else 4), 1, 32, 32)
        rate, _ = timed(vm, gray, 1 if args.tiny else args.k, args.repeats, device)
        print(f"sdedit-prior fp32 ({args.prior.name}, strength 0.5, 10 DDIM steps): {rate:.1f} variations/s")


if __name__ == "__main__":
    main()
