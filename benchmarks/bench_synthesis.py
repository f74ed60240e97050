"""Synthesis throughput and overhead: ``dfkd synthesize`` vs the raw teacher+generator forward/backward.

Prints, per method, optimised images per second of the real synthesis loop (run_synthesis, i.e. what
``dfkd synthesize`` runs, minus process start-up) and of a bare loop doing only the generator (or pixel)
forward, teacher forward, a CE loss, backward and the optimiser step on the same batch size, engine and
precision. ``overhead = raw / dfkd`` (goal <= 1.2). Also prints the precision/memory-format sweep that chose
the defaults (bf16 autocast + channels_last on CPU).

    python benchmarks/bench_synthesis.py [--methods dafl deepinversion] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from _common import ROOT, teacher_or_untrained

from dfkd_common.checkpoint import load_model
from dfkd_common.config import values
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine
from dfkd_common.loops.synthesis_rounds import run_synthesis, split_params
from dfkd_common.models import build_generator
from dfkd_common.params import merge
from dfkd_common.synthesis.base import SYNTHESIZERS


def method_params(method: str) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["synthesize"]
    return merge(params.get("common", {}), params.get(method, {}))


def raw_throughput(method: str, teacher: torch.nn.Module, cfg: dict, engine: Engine, steps: int) -> float:
    """Images/s of generator (or pixels) -> teacher -> CE -> backward -> step, nothing else."""
    info = get_dataset("mnist5k").info
    b = int(cfg["batch_size"])
    teacher = engine.model(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if method == "deepinversion":
        v = torch.randn(b, 1, 32, 32, device=engine.device, requires_grad=True)
        params, make = [v], (lambda: v)
    else:
        g = engine.model(build_generator("dcgan", nz=int(cfg.get("nz", 100)), ngf=int(cfg.get("ngf", 64)),
                                         image_size=32, channels=1, head="dafl", mean=info.mean, std=info.std))
        params = list(g.parameters())
        z = torch.randn(b, int(cfg.get("nz", 100)), device=engine.device)
        make = lambda: g(z)  # noqa: E731
    opt = torch.optim.Adam(params, lr=1e-3)
    y = torch.randint(0, 10, (b,), device=engine.device)

    def step() -> None:
        with engine.autocast():
            loss = F.cross_entropy(teacher(engine.images(make())).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * b / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["dafl", "deepinversion"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teacher", type=Path, default=ROOT / "artifacts/teachers/lenet5.safetensors")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = teacher_or_untrained(args.teacher, Path(tmp))
        for method in args.methods:
            SYNTHESIZERS.get(method)
            cfg = method_params(method)
            cfg["rounds"] = args.rounds
            amp = bool(cfg.pop("amp", True))
            engine = Engine.create("cpu", amp=amp, channels_last=bool(cfg.pop("channels_last", True)))
            teacher, meta = load_model(teacher_path)
            run, method_cfg = split_params(cfg, method)
            full = values(SYNTHESIZERS.get(method).config(method_cfg))
            steps = args.rounds * int(full["g_steps"])
            res = run_synthesis(method, teacher, meta, teacher_path, Path(tmp) / f"{method}.h5", run, method_cfg,
                                engine)
            dfkd_ips = steps * int(full["batch_size"]) / res["seconds"]
            raw_ips = raw_throughput(method, load_model(teacher_path)[0], full, engine, min(steps, 30))
            print(f"{method:14s} dfkd {dfkd_ips:8.1f} optimised img/s | raw fwd+bwd {raw_ips:8.1f} img/s | "
                  f"overhead {raw_ips / dfkd_ips:5.2f} | bank {res['images']} images in {res['seconds']:.1f}s")
            for amp_on, cl in ((False, False), (False, True), (True, False), (True, True)):
                e = Engine.create("cpu", amp=amp_on, channels_last=cl)
                ips = raw_throughput(method, load_model(teacher_path)[0], full, e, 10)
                print(f"    raw sweep: bf16 autocast={amp_on!s:5s} channels_last={cl!s:5s} {ips:8.1f} img/s")


if __name__ == "__main__":
    main()
