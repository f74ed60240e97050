"""Peer adapter for VainF/Data-Free-Adversarial-Distillation (Fang et al., 2019): DFAD on CIFAR-10 as released.

The authors' code is not copied here. ``DFAD_cifar.py`` is imported where it lies (its ``main()`` is guarded) and
its own ``train(args, teacher, student, generator, device, optimizer, epoch)`` is called, on the networks its
``main()`` builds: ``network.resnet_8x.ResNet34_8x`` teacher, ``ResNet18_8x`` student, ``network.gan.GeneratorA``
(nz 256). What changes, and why:

* **CPU**: ``device=torch.device('cpu')`` is passed to ``train()`` (their ``main()`` picks CPU itself when CUDA
  is absent, line 121/130); nothing in ``train()`` calls ``.cuda()``.
* **Random weights**: the teacher comes from the checkpoint :func:`export_teacher` wrote. ``DFAD_cifar.py``
  loads a bare state dict (line 141); the benchmark's common layout is ``{'state_dict': ...}``, and :func:`run`
  accepts both.
* **No CIFAR-10 on disk**: their ``main()`` builds the test loader first (line 134) and evaluates after every
  epoch; neither is timed, so :func:`run` builds the networks and optimisers as ``main()`` does (lines 136-151)
  and calls ``train()`` directly.
* **Missing packages**: ``visdom`` (``utils/visualizer.py``; ``DFAD_cifar.py`` makes a ``VisdomPlotter`` at import
  and ``train()`` calls ``vp.add_scalar`` every ``log_interval`` iterations) is stubbed with a ``Visdom`` whose
  methods do nothing, so their plotter code runs as released without a server; ``torchvision.models.utils``
  (gone from torchvision, imported by ``network/segmentation``, unused here) is stubbed when absent.

Only ResNet-34 -> ResNet-18 exists in this repository (``network/`` has no WRN), so only ``r34_r18`` is offered.
Run one adapter per process: the repository's top-level names (``network``, ``utils``, ``dataloader``,
``dataset``) are generic; importing purges modules of those names from other folders first.
"""

from __future__ import annotations

import importlib
import random
import sys
import types
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # imported as peers.X (the benchmark) or with benchmarks/peers on sys.path
    from . import shim
except ImportError:  # pragma: no cover
    import shim  # type: ignore[no-redef]

if TYPE_CHECKING:  # the benchmark imports the recorder; adapters only call rec.phase()
    from peers.timing import Recorder

REPO = "Data-Free-Adversarial-Distillation"
METHODS: dict[str, str] = {"dfad": "DFAD_cifar.py train()"}
PAIRS: dict[str, tuple[str, str]] = {"r34_r18": ("ResNet34_8x", "ResNet18_8x")}

# DFAD_cifar.py argparse defaults (line numbers) and README.md:82's command line (adds --scheduler)
_SOURCE = ("DFAD_cifar.py:86-118 (argparse defaults: batch_size 256 l.86, epochs 500 l.91, epoch_itrs 50 l.93, "
           "lr_S 0.1 l.94, lr_G 1e-3 l.96, weight_decay 5e-4 l.104, seed 1 l.109, log_interval 10 l.112, nz 256 "
           "l.114); l.24 5 student steps per generator step; l.150-155 SGD momentum 0.9, Adam, MultiStepLR "
           "[100, 200] x0.1 per epoch; README.md:82 `python DFAD_cifar.py --dataset cifar10 --ckpt ... --scheduler`")
_DEFAULTS: dict[str, Any] = {"batch_size": 256, "epochs": 500, "epoch_itrs": 50, "lr_S": 0.1, "lr_G": 1e-3,
                             "weight_decay": 5e-4, "seed": 1, "log_interval": 10, "nz": 256}
_THEIRS = ("network", "utils", "dataloader", "dataset", "DFAD_cifar")


def _pair(pair: str) -> tuple[str, str]:
    if pair not in PAIRS:
        raise ValueError(f"{REPO} has only ResNet-34 -> ResNet-18 for CIFAR (network/resnet_8x.py); no pair {pair!r}")
    return PAIRS[pair]


def _method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"{REPO} adapter: no method {method!r}; it has {sorted(METHODS)}")
    return METHODS[method]


def published(method: str, pair: str) -> dict[str, Any]:
    """The published CIFAR-10 settings, read off ``DFAD_cifar.py``'s defaults and README.md:82 (the repository
    has no CIFAR script).

    DFAD has no separate synthesis: one *iteration* of ``train()`` is 5 student steps on fresh ``G(z)`` then one
    generator step (lines 23-46). Here ``kd_steps`` is iterations per ``train()`` call (``epoch_itrs``, 50: the
    README calls 50 iterations an "epoch", after which ``main()`` evaluates), ``g_steps`` is generator steps
    per iteration (1), ``student_steps_per_iteration`` is 5, and one ``train()`` call is one round.
    """
    _method(method)
    teacher, student = _pair(pair)
    d = _DEFAULTS
    return {
        "repo": REPO, "method": method, "authors_method": METHODS[method], "pair": pair, "dataset": "cifar10",
        "num_classes": 10, "teacher": teacher, "student": student, "generator": "GeneratorA", "source": _SOURCE,
        "synthesis_batch": d["batch_size"], "g_steps": 1, "kd_steps": d["epoch_itrs"], "batch_size": d["batch_size"],
        "student_steps_per_iteration": 5, "rounds_per_epoch": 1, "epochs": d["epochs"], "warmup": 0,
        "lr_g": d["lr_G"], "lr": d["lr_S"], "momentum": 0.9, "weight_decay": d["weight_decay"], "nz": d["nz"],
        "ngf": 64, "loss": "L1 on logits", "scheduler": "MultiStepLR([100, 200], 0.1) per epoch, both optimisers",
        "seed": d["seed"], "log_interval": d["log_interval"], "online": True,
        "generator_steps_total": d["epochs"] * d["epoch_itrs"],
        "student_steps_total": d["epochs"] * d["epoch_itrs"] * 5,
    }


def defaults_in_file(repo: Path) -> dict[str, str]:
    """``DFAD_cifar.py``'s argparse defaults as the extracted file has them (for :func:`run`'s check)."""
    import re

    text = (repo / "DFAD_cifar.py").read_text()
    pattern = r"add_argument\(\s*'--([\w-]+)'[^)]*?default=([^,)\s]+)"
    return {k.replace("-", "_"): v for k, v in re.findall(pattern, text)}


def _check_defaults(repo: Path) -> None:
    found = defaults_in_file(repo)
    for key, want in _DEFAULTS.items():
        if key not in found or float(found[key]) != float(want):
            raise ValueError(f"{REPO}: DFAD_cifar.py has --{key} default {found.get(key)}, the adapter's table {want}")


def _stub_missing() -> list[str]:
    """Stub what their imports need but this environment lacks; returns what was stubbed (for the notes)."""
    import torch

    stubbed: list[str] = []
    try:
        import visdom  # noqa: F401
    except ImportError:
        class Visdom:
            """Every method a no-op: no visdom server (their plots are not part of the run being timed)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __getattr__(self, name: str) -> Any:
                return lambda *args, **kwargs: None

        mod = types.ModuleType("visdom")
        mod.Visdom = Visdom  # type: ignore[attr-defined]
        sys.modules["visdom"] = mod
        stubbed.append("visdom (Visdom methods are no-ops; their VisdomPlotter runs on it unchanged)")
    try:
        import torchvision.models.utils  # noqa: F401
    except ImportError:
        mod = types.ModuleType("torchvision.models.utils")
        mod.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = mod
        stubbed.append("torchvision.models.utils (removed from torchvision; imported by network/segmentation, "
                       "never called)")
    return stubbed


def _load(repo: Path) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """Import ``DFAD_cifar`` (and so their ``network`` package) from ``repo``."""
    import dfkd_common.tvguard  # noqa: F401  (before torchvision: the CPU torch and CUDA torchvision wheels)

    repo = repo.resolve()
    for name in list(sys.modules):
        if name.split(".")[0] in _THEIRS:
            file = getattr(sys.modules[name], "__file__", None)
            if not file or not Path(file).resolve().is_relative_to(repo):
                del sys.modules[name]  # another project's module of the same name
    stubbed = _stub_missing()
    while str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    mod = importlib.import_module("DFAD_cifar")
    return mod, sys.modules["network"], stubbed


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0) -> None:
    """Build their ``ResNet34_8x`` (``torch.manual_seed(seed)`` init, its own Kaiming init) and save
    ``{'state_dict': ...}``: random weights time the same as trained ones."""
    import torch

    _, network, _ = _load(repo)
    teacher, _ = _pair(pair)
    torch.manual_seed(seed)
    model = getattr(network.resnet_8x, teacher)(num_classes=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None) -> dict[str, Any]:
    """Build teacher, student, generator and optimisers as ``DFAD_cifar.py``'s ``main()`` does (lines 123-151),
    then time ``rounds`` calls of their ``train()``, each ``kd_steps`` iterations (``args.epoch_itrs``) of 5
    student steps and one generator step, one ``online`` phase per call.

    ``g_steps`` is recorded but cannot change anything: ``train()`` makes one generator step per iteration.
    ``batch`` (smoke tests) replaces ``args.batch_size``, the one batch size of both kinds of step. The per-epoch
    scheduler and test-set evaluation of ``main()`` are not run (not part of a training call)."""
    import numpy as np
    import torch
    from torch import optim

    _method(method)
    pub = published(method, pair)
    t_name, s_name = _pair(pair)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mod, network, stubbed = _load(repo)
    _check_defaults(repo.resolve())
    bs = pub["batch_size"] if batch is None else batch
    args = Namespace(batch_size=bs, epoch_itrs=kd_steps, nz=pub["nz"], log_interval=pub["log_interval"],
                     lr_S=pub["lr"], lr_G=pub["lr_g"], weight_decay=pub["weight_decay"], dataset="cifar10",
                     seed=pub["seed"])
    device = torch.device("cpu")
    notes = [f"stubbed: {s}" for s in stubbed]
    notes.append(f"settings from {pub['source']}")
    notes.append("device=cpu passed to train(); main() (test loader, evaluation, checkpoint saving, scheduler) "
                 "is not run: the networks and optimisers are built as its lines 123-151 build them")
    if kd_steps != pub["kd_steps"]:
        notes.append(f"kd_steps = epoch_itrs {kd_steps} iterations per train() call (published {pub['kd_steps']}): "
                     "extrapolate")
    if g_steps != 1:
        notes.append(f"g_steps {g_steps} ignored: DFAD's train() makes one generator step per iteration")
    if batch is not None:
        notes.append(f"batch {batch} (published {pub['batch_size']}): a smoke test, not a timing")
    with shim.in_dir(workdir):
        torch.manual_seed(args.seed)  # DFAD_cifar.py:123-126
        np.random.seed(args.seed)
        random.seed(args.seed)
        num_classes = 10 if args.dataset == "cifar10" else 100
        t_model = getattr(network.resnet_8x, t_name)(num_classes=num_classes)
        student = getattr(network.resnet_8x, s_name)(num_classes=num_classes)
        generator = network.gan.GeneratorA(nz=args.nz, nc=3, img_size=32)
        state = torch.load(teacher, map_location="cpu")
        t_model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        t_model = t_model.to(device)
        student = student.to(device)
        generator = generator.to(device)
        t_model.eval()
        optimizer_s = optim.SGD(student.parameters(), lr=args.lr_S, weight_decay=args.weight_decay, momentum=0.9)
        optimizer_g = optim.Adam(generator.parameters(), lr=args.lr_G)
        for r in range(rounds):
            with rec.phase("online"):
                mod.train(args, teacher=t_model, student=student, generator=generator, device=device,
                          optimizer=[optimizer_s, optimizer_g], epoch=r + 1)
    return {
        "repo": REPO, "method": method, "authors_method": METHODS[method], "pair": pair, "published": pub,
        "used": {"synthesis_batch": bs, "batch_size": bs, "g_steps": 1, "kd_steps": kd_steps,
                 "student_steps_per_iteration": 5, "rounds": rounds, "device": "cpu",
                 "threads": torch.get_num_threads()},
        "stubbed": stubbed, "notes": notes,
    }
