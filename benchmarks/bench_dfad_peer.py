"""Our DFAD iteration against the authors' own ``DFAD_mnist.py``: same machine, same settings, interleaved.

    python benchmarks/bench_dfad_peer.py --peer PATH [--iterations 3] [--reps 3] [--amp auto true]

``PATH`` is a checkout of the authors' repository (VainF/Data-Free-Adversarial-Distillation); nothing of it is
copied here, it is run where it lies. One DFAD *iteration* is what both codes call one: 5 student steps on fresh
``G(z)`` (batch 512) minimising the L1 logit gap, then one generator step maximising it. Settings are the
published MNIST ones on both sides: LeNet-5 teacher and LeNet-5-half student without BatchNorm (the authors'
networks), nz 100, ngf 64, batch 512, student SGD lr 0.01 wd 1e-4, generator Adam 1e-3. Weights are untrained:
time does not depend on them.

* **ours**: ``dfkd distill --online dfad`` as a user runs it (one epoch of ``--iterations`` iterations, in a
  subprocess; its metrics' ``seconds`` cover the distillation loop, including the epoch's test-set evaluation,
  the resume save and the recorded sample, none of which the peer does), once per ``--amp`` setting;
* **peer**: the authors' ``train()`` from ``DFAD_mnist.py`` with ``epoch_itrs = --iterations``, on their
  ``GeneratorA``/``LeNet5``/``LeNet5Half``, in a subprocess of its own. Their package ``__init__`` files import
  modules that current torchvision no longer has (``torchvision.models.utils``) and ``visdom``; the worker loads
  only the two network modules and ``DFAD_mnist.py`` itself (its data loader module is stubbed: ``train()``
  never uses it).

Contenders run in turn, repetition by repetition (this VM's speed drifts within minutes), and the medians are
compared. Both processes use torch's default thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from _common import DFKD, ROOT, machine


def peer_worker(peer: Path, iterations: int) -> None:
    """Run in a subprocess: the authors' ``train()`` for ``iterations`` iterations; prints ``{"seconds": s}``."""
    import argparse as _argparse

    import torch
    from torch import optim

    import dfkd_common.tvguard  # noqa: F401  (torchvision on the CPU build of torch; DFAD_mnist imports it)

    sys.path.insert(0, str(peer))
    network = types.ModuleType("network")
    network.__path__ = [str(peer / "network")]  # a namespace: skip __init__ (segmentation, old torchvision)
    sys.modules["network"] = network
    loader_stub = types.ModuleType("dataloader")
    loader_stub.get_dataloader = None  # type: ignore[attr-defined]  # train() never loads data
    sys.modules["dataloader"] = loader_stub
    import network.gan
    import network.lenet

    spec = importlib.util.spec_from_file_location("DFAD_mnist", peer / "DFAD_mnist.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(1)
    teacher = network.lenet.LeNet5().eval()  # type: ignore[attr-defined]
    student = network.lenet.LeNet5Half()  # type: ignore[attr-defined]
    generator = network.gan.GeneratorA(nz=100, nc=1, img_size=32)  # type: ignore[attr-defined]
    opt_s = optim.SGD(student.parameters(), lr=0.01, weight_decay=1e-4, momentum=0.9)
    opt_g = optim.Adam(generator.parameters(), lr=1e-3)
    args = _argparse.Namespace(epoch_itrs=iterations, batch_size=512, nz=100, verbose=False, log_interval=10)
    t0 = time.perf_counter()
    mod.train(args, teacher=teacher, student=student, generator=generator, device=torch.device("cpu"),
              optimizer=[opt_s, opt_g], epoch=1)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def write_inputs(tmp: Path, iterations: int) -> tuple[Path, Path]:
    """A BN-free LeNet-5 teacher checkpoint (the authors' network) and a params file with the published settings."""
    import yaml

    from dfkd_common import __version__
    from dfkd_common.checkpoint import ModelMeta, now, save_model
    from dfkd_common.data import get_dataset
    from dfkd_common.models import build_model

    info = get_dataset("mnist5k").info
    teacher = tmp / "lenet5_nobn.safetensors"
    save_model(teacher, build_model("lenet5", 10, 1, info.mean, info.std, batchnorm=False),
               ModelMeta("lenet5", {"batchnorm": False}, info, {}, {}, now(), __version__, "teacher"))
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 1, "distill": {"dfad": {
        "student": "lenet5_half", "student_kwargs": {"batchnorm": False}, "weights": {"kd": 0.0, "l1": 1.0},
        "epochs": 1, "batch_size": 512, "lr": 0.01, "weight_decay": 0.0001, "augment": {"crop_pad": 0, "flip": False},
        "online": {"nz": 100, "ngf": 64, "lr_g": 0.001, "student_steps": 5, "iterations": iterations,
                   "record": 16},
    }}}))
    return teacher, params


def run_ours(tmp: Path, teacher: Path, params: Path, amp: str, iterations: int, env: dict[str, str]) -> float:
    out = tmp / f"student-{amp}.safetensors"
    metrics = tmp / f"metrics-{amp}.json"
    for stale in tmp.glob(f"*student-{amp}*"):
        stale.unlink()
    cmd = [*DFKD, "distill", "--name", "dfad", "--online", "dfad", "--teacher", str(teacher), "--out", str(out),
           "--metrics", str(metrics), "--params", str(params), "--set", f"online.amp={amp}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dfkd distill failed:\n{proc.stderr}")
    return float(json.loads(metrics.read_text())["seconds"]) / iterations


def run_peer(peer: Path, iterations: int, env: dict[str, str]) -> float:
    cmd = [sys.executable, __file__, "--peer", str(peer), "--worker", "--iterations", str(iterations)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the peer's train() failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]) / iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", type=Path, required=True, help="checkout of VainF/Data-Free-Adversarial-Distillation")
    ap.add_argument("--iterations", type=int, default=3, help="DFAD iterations per timed run")
    ap.add_argument("--reps", type=int, default=3, help="runs of each contender, interleaved")
    ap.add_argument("--amp", nargs="+", default=["auto"], help="our online.amp settings to time (auto true false)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    peer = args.peer.resolve()
    if args.worker:
        peer_worker(peer, args.iterations)
        return
    if not (peer / "DFAD_mnist.py").is_file():
        sys.exit(f"{peer} has no DFAD_mnist.py: point --peer at a checkout of the authors' repository")
    env = {**os.environ, "DFKD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    print(machine())
    print(f"published MNIST settings (batch 512, nz 100, ngf 64), {args.iterations} iterations per run, "
          f"{args.reps} interleaved runs each")
    times: dict[str, list[float]] = {f"ours amp={a}": [] for a in args.amp} | {"peer": []}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        teacher, params = write_inputs(tmp, args.iterations)
        for _ in range(args.reps):
            for amp in args.amp:
                times[f"ours amp={amp}"].append(run_ours(tmp, teacher, params, amp, args.iterations, env))
            times["peer"].append(run_peer(peer, args.iterations, env))
    peer_s = statistics.median(times["peer"])
    for name, values in times.items():
        med = statistics.median(values)
        runs = " ".join(f"{v:.2f}" for v in values)
        ratio = "" if name == "peer" else f"  -> {peer_s / med:.2f}x the peer's speed"
        print(f"{name:16s} median {med:6.2f} s/iteration  (runs {runs}){ratio}")


if __name__ == "__main__":
    main()
