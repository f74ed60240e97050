"""Peer adapter: the authors' CSD (luoshiya/CSD, ICME 2023), the code DDA (ACM MM 2024) builds on, run where it
lies, for ``bench_vs_reference.py``.

Nothing of theirs is copied here. Their ``datafree_kd.py`` guards ``main()`` but parses the command line at module
level (l.123 ``args = parser.parse_args()``, with ``--method`` required) and opens a TensorBoard ``SummaryWriter``
there too (l.125). The narrowest way in: import it under its own name (``peer_csd_datafree_kd``) with
``sys.argv`` set, for the import only, to the published script's command line (scripts/csd/
csd_cifar10_wrn402_wrn161.sh), so the module-level parse succeeds as it would for the authors. The adapter then
repeats ``main_worker()``'s set-up statements for ``--method csd`` (l.244-320) with their classes
(``registry.get_model``, ``datafree.utils.AlignHead``, ``datafree.synthesis.CSDSynthesizer`` with its rotation
head ``MLPHead`` and the head's own SGD, the student SGD over student + AlignHead, the cosine schedule). It cannot
call ``main_worker()``: it downloads CIFAR-10, evaluates every epoch and loops 100 epochs. The timed calls are
theirs, unchanged: ``synthesizer.synthesize()``, ``synthesizer.reset_head()`` and ``datafree_kd.train()`` (which
calls ``synthesizer.train_head()`` after every student step).

What CPU execution needs, and nothing else:

* ``args.gpu = None``: their own CPU branch (``train()`` moves tensors with ``.cuda(args.gpu)`` only when it is
  not None); ``device=torch.device('cpu')`` for the synthesizer, and ``.to(args.gpu)`` calls of main_worker
  (l.296, 301) become ``.to(cpu)``. ``Tensor.cuda``/``Module.cuda`` are identity while :func:`run` runs, as a
  safety net; the count of calls that reached them is returned (0 on these paths).
* CIFAR-10 is never loaded: ``registry.get_dataset`` runs with ``registry.datasets`` swapped for a stand-in whose
  ``CIFAR10`` keeps only its ``transform`` (the bank's augmentation).
* Stubbed in ``sys.modules`` only when missing: ``torch.utils.tensorboard`` (tensorboard is not installed;
  ``SummaryWriter`` is a no-op: l.125 builds one at import, the epoch loop's ``add_scalar`` calls are not run)
  and ``termcolor`` (their logger's colouring).

Their top-level module names (``datafree``, ``registry``) are shared with other authors' repositories (CMI's
family): modules of those names loaded from elsewhere are dropped from ``sys.modules`` before the import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import shutil
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:  # imported as peers.X (the benchmark) or with benchmarks/peers on sys.path
    from . import shim
except ImportError:  # pragma: no cover
    import shim  # type: ignore[no-redef]

if TYPE_CHECKING:
    from peers.timing import Recorder

REPO: str = "CSD"
METHODS: dict[str, str] = {"dda": "csd"}  # datafree_kd.py --method csd

# dfkd pair -> their registry names (registry.py MODEL_DICT)
PAIRS: dict[str, tuple[str, str]] = {
    "r34_r18": ("resnet34", "resnet18"),
    "w402_w162": ("wrn40_2", "wrn16_2"),
    "w402_w161": ("wrn40_2", "wrn16_1"),
}
_SHORT = {"resnet34": "resnet34", "resnet18": "resnet18", "wrn40_2": "wrn402", "wrn16_2": "wrn162",
          "wrn16_1": "wrn161"}

# scripts/csd/csd_cifar10_wrn402_wrn161.sh lines 2-23 (the main run; the only published CSD pair)
MAIN_ARGV: tuple[str, ...] = (
    "--method", "csd", "--dataset", "cifar10", "--batch_size", "128", "--teacher", "wrn40_2",
    "--student", "wrn16_1", "--lr", "0.1", "--epochs", "100", "--kd_steps", "2000", "--ep_steps", "2000",
    "--g_steps", "200", "--synthesis_batch_size", "200", "--lr_g", "1e-3", "--csd", "10", "--adv", "0",
    "--bn", "1.0", "--oh", "1.0", "--gpu", "0", "--seed", "1", "--T", "20",
    "--save_dir", "run/csd/cifar10_wrn402_wrn161", "--init_bank", "run/csd/cifar10_wrn402_initBank", "--run_kd",
)  # fmt: skip
# scripts/csd/csd_cifar10_initBank_wrn402.sh lines 2-19 (the initial bank: csd 0, no student training)
INIT_ARGV: tuple[str, ...] = (
    "--method", "csd", "--dataset", "cifar10", "--batch_size", "128", "--teacher", "wrn40_2",
    "--student", "wrn16_1", "--lr", "0.1", "--epochs", "400", "--g_steps", "500", "--synthesis_batch_size", "200",
    "--lr_g", "1e-3", "--csd", "0", "--adv", "0", "--bn", "1.0", "--oh", "1.0", "--gpu", "0", "--seed", "1",
    "--save_dir", "run/csd/cifar10_wrn402_initBank", "--log_tag", "init_bank",
)  # fmt: skip
_TOPS = ("datafree", "registry")  # their top-level module names
_SCRIPT = "peer_csd_datafree_kd"  # the name their datafree_kd.py is imported under
_SYNTH_WORKERS = 4  # datafree/synthesis/csd.py l.173: DataLoader(num_workers=4), hard-coded (``--workers`` unused)


def _check(method: str, pair: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{REPO} adapter runs {sorted(METHODS)}, not {method!r}")
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; known: {sorted(PAIRS)}")


def _argv_for(argv: tuple[str, ...], teacher: str, student: str) -> list[str]:
    """A published command with ``--teacher``/``--student`` (and the pair-named folders) set to the pair."""
    out = list(argv)
    out[out.index("--teacher") + 1] = teacher
    out[out.index("--student") + 1] = student
    t, s = _SHORT[teacher], _SHORT[student]
    for flag in ("--save_dir", "--init_bank"):
        if flag in out:
            i = out.index(flag) + 1
            out[i] = out[i].replace("wrn402_wrn161", f"{t}_{s}").replace("wrn402_initBank", f"{t}_initBank")
    return out


def published(method: str, pair: str) -> dict[str, Any]:
    """The authors' published CIFAR-10 settings for (method, pair), read off their scripts, README and
    datafree_kd.py's parser defaults; ``source`` says where each comes from.

    Only WRN-40-2 -> WRN-16-1 has scripts; other pairs get the same flags with ``--teacher``/``--student``
    changed (``pair_published`` False). The initial bank (README section 3) is a separate run of the same
    script with ``--csd 0``: its settings are the ``init_*`` keys."""
    _check(method, pair)
    teacher, student = PAIRS[pair]
    return {
        "source": ("CSD/scripts/csd/csd_cifar10_wrn402_wrn161.sh lines 1-23 (main run); "
                   "CSD/scripts/csd/csd_cifar10_initBank_wrn402.sh lines 1-19 (initial bank); CSD/README.md "
                   "lines 21-27 (bank: 400 batches x 200, csd 0); datafree_kd.py parser defaults l.30-121 "
                   "(fea 30 l.38, momentum 0.9 l.113, weight decay 1e-4 l.115, print_freq 0 l.118); nz 256 / "
                   "ngf 64: l.293-294; one round per epoch: ep_steps // kd_steps, l.367; head SGD lr = --lr, "
                   "wd 1e-4, momentum .9: datafree/synthesis/csd.py l.98; loader num_workers 4: csd.py l.173"),
        "pair_published": pair == "w402_w161",
        "teacher": teacher,
        "student": student,
        "dataset": "cifar10",
        "synthesis_batch": 200,
        "g_steps": 200,
        "kd_steps": 2000,
        "ep_steps": 2000,
        "batch_size": 128,
        # train_head() after every student step forwards the batch's 4 rotations through the student again
        "student_images_per_step": 128,
        "head_images_per_step": 4 * 128,
        "synthesis_student_images_per_step": 4 * 200,  # CSD term: 4 rotations of every synthesised image
        "rounds_per_epoch": 1,
        "epochs": 100,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "CosineAnnealingLR(T_max=epochs), stepped once per epoch",
        "lr_g": 1e-3,
        "g_betas": (0.5, 0.999),
        "T": 20.0,
        "csd": 10.0,  # DDA's 'dda' weight
        "adv": 0.0,
        "bn": 1.0,
        "oh": 1.0,
        "fea": 30.0,
        "head_lr": 0.1,
        "seed": 1,
        "nz": 256,
        "ngf": 64,
        "synthesis_num_workers": _SYNTH_WORKERS,
        "init_rounds": 400,
        "init_g_steps": 500,
        "init_synthesis_batch": 200,
        "init_csd": 0.0,
        "init_student_training": False,  # the init script has no --run_kd
        "init_bank_images": 400 * 200,
        "argv": _argv_for(MAIN_ARGV, teacher, student),
        "init_argv": _argv_for(INIT_ARGV, teacher, student),
    }


# -- loading their code ----------------------------------------------------------------------------------------
def _stub_missing() -> list[str]:
    """Stub the modules their imports need that this environment lacks; return what is stubbed (now or before)."""
    try:
        importlib.import_module("termcolor")
    except ImportError:
        mod = types.ModuleType("termcolor")
        mod.colored = lambda text, *a, **k: text  # type: ignore[attr-defined]
        mod.__peer_stub__ = "termcolor (colored = identity; their logger's colouring)"  # type: ignore[attr-defined]
        sys.modules["termcolor"] = mod
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        sys.modules.pop("torch.utils.tensorboard", None)

        class SummaryWriter:
            """No-op stand-in: datafree_kd.py builds one at import (l.125); train() never writes to it."""

            def __init__(self, *a: Any, **k: Any) -> None:
                pass

            def __getattr__(self, name: str) -> Any:
                return lambda *a, **k: None

        mod = types.ModuleType("torch.utils.tensorboard")
        mod.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
        mod.__peer_stub__ = (  # type: ignore[attr-defined]
            "torch.utils.tensorboard (SummaryWriter no-op; tensorboard not installed)")
        sys.modules["torch.utils.tensorboard"] = mod
    stubs = (sys.modules.get(name) for name in ("termcolor", "torch.utils.tensorboard"))
    return [m.__dict__["__peer_stub__"] for m in stubs if m is not None and "__peer_stub__" in m.__dict__]


def _from(mod: types.ModuleType, repo: Path) -> bool:
    f = getattr(mod, "__file__", None)
    return f is not None and Path(f).resolve().is_relative_to(repo)


def _import_package(repo: Path) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """Their ``registry`` and ``datafree`` with ``repo`` first on ``sys.path`` (others' same-named ones dropped)."""
    import dfkd_common.tvguard  # noqa: F401  (before anything imports torchvision)

    stubbed = _stub_missing()
    for name in list(sys.modules):
        if name.split(".")[0] in _TOPS and not _from(sys.modules[name], repo):
            del sys.modules[name]
    while str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    return importlib.import_module("registry"), importlib.import_module("datafree"), stubbed


def _load(repo: Path, argv: list[str]) -> tuple[types.ModuleType, list[str]]:
    """Import their datafree_kd.py (as ``peer_csd_datafree_kd``); ``argv`` feeds its module-level parse."""
    repo = repo.resolve()
    _, _, stubbed = _import_package(repo)
    cached = sys.modules.get(_SCRIPT)
    if cached is not None and _from(cached, repo):
        return cached, stubbed
    spec = importlib.util.spec_from_file_location(_SCRIPT, repo / "datafree_kd.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no datafree_kd.py in {repo}")
    mod = importlib.util.module_from_spec(spec)
    saved = sys.argv
    sys.argv = ["datafree_kd.py", *argv]
    sys.modules[_SCRIPT] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_SCRIPT, None)
        raise
    finally:
        sys.argv = saved
    return mod, stubbed


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0) -> None:
    """Build their teacher for ``pair`` with their ``registry.get_model`` (as datafree_kd.py l.245 does) from
    ``torch.manual_seed(seed)`` and save ``{'state_dict': ...}``, the layout l.247 loads. CSD's control flow does
    not depend on the teacher's predictions (targets are drawn, not taken from the teacher), so random weights
    time as trained ones do; a file exported by the RGAL adapter (same WRN/ResNet keys) loads as well."""
    _check("dda", pair)
    registry, _, _ = _import_package(Path(repo).resolve())
    torch.manual_seed(seed)
    model = registry.get_model(PAIRS[pair][0], num_classes=10, pretrained=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None, *, synthesis_batch: int | None = None,
        init_rounds: int = 1, init_g_steps: int = 1) -> dict[str, Any]:
    """Run ``rounds`` CSD epochs of the main run (after the initial bank) with their code.

    Built as datafree_kd.py's ``main()``/``main_worker()`` builds ``--method csd`` at the script's settings
    (seeding l.131-134, models l.244-250, generator and AlignHead l.293-301, synthesizer l.302-306, SGD + cosine
    l.314-320), except: CPU, ``iterations=g_steps``, ``args.kd_steps = kd_steps``, teacher weights from
    ``teacher``, ``batch`` (smoke tests) replacing every batch size, ``synthesis_batch`` (keyword) the synthesis
    batch alone (main run and bank).

    The initial bank: the main run reads it every round (``--init_bank``, a ``LabeledImageDataset`` concatenated
    with the pool), so it must exist. It is made, untimed, by their ``CSDSynthesizer`` at the init script's
    settings (``csd 0``), but for ``init_rounds`` rounds of ``init_g_steps`` steps instead of 400 x 500 (keywords);
    its BN hooks are removed afterwards (in the authors' flow it is another process); each of its rounds is
    wrapped in phase ``init``, which ``Recorder.summary`` ignores. cwd is ``workdir``; the
    pool and bank folders there are emptied first. Per round, as their loop (l.362-376) does: ``synthesize()``
    and ``reset_head()`` in phase ``synth``, ``train(...)`` in phase ``student``, then ``scheduler.step()``
    (their per-epoch evaluations, image dump and checkpoint are left out: none is timed)."""
    _check(method, pair)
    repo, teacher, workdir = Path(repo).resolve(), Path(teacher).resolve(), Path(workdir).resolve()
    pub = published(method, pair)
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    with shim.in_dir(workdir), shim.cuda_is_identity() as cuda_calls:
        script, stubbed = _load(repo, pub["argv"])
        datafree, registry = script.datafree, script.registry
        args = script.parser.parse_args(pub["argv"])
        init_args = script.parser.parse_args(pub["init_argv"])
        # main(): seeding (l.131-134)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = True
        # main_worker(): single process, CPU, fp32
        args.distributed = False
        args.gpu = None
        args.autocast = datafree.utils.dummy_ctx
        args.g_steps = g_steps
        args.kd_steps = kd_steps
        args.ep_steps = kd_steps  # keeps ep_steps // kd_steps == 1 round per epoch, as published (2000 // 2000)
        init_args.g_steps = init_g_steps
        if batch is not None:
            args.batch_size = args.synthesis_batch_size = batch
            init_args.batch_size = init_args.synthesis_batch_size = batch
        if synthesis_batch is not None:
            args.synthesis_batch_size = init_args.synthesis_batch_size = synthesis_batch
        script.args = args  # their module-level namespace, for anything that reads it rather than its parameter
        for folder in (args.save_dir, args.init_bank):
            shutil.rmtree(workdir / folder, ignore_errors=True)

        num_classes = 10
        transform = shim.train_transform(registry, args.dataset)
        student = registry.get_model(args.student, num_classes=num_classes)
        t_model = registry.get_model(args.teacher, num_classes=num_classes, pretrained=True).eval()
        args.normalizer = normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT[args.dataset])
        t_model.load_state_dict(torch.load(teacher, map_location="cpu")["state_dict"])
        criterion = datafree.criterions.KLDiv(T=args.T)
        if args.synthesis_batch_size is None:
            args.synthesis_batch_size = args.batch_size

        nz = 256
        generator = datafree.models.generator.Generator(nz=nz, ngf=64, img_size=32, nc=3)
        data = torch.randn(2, 3, 32, 32).to(cpu)
        t_model.eval()
        student.eval()
        _, fea_t = t_model(data, return_features=True)
        _, fea_s = student(data, return_features=True)
        alignhead = datafree.utils.AlignHead(fea_s[-2].shape, fea_t[-2].shape).to(cpu)

        # the initial bank (untimed): the init script's synthesizer, csd 0, no student training
        init_synth = datafree.synthesis.CSDSynthesizer(
            teacher=t_model, student=student,
            generator=datafree.models.generator.Generator(nz=nz, ngf=64, img_size=32, nc=3),
            nz=nz, num_classes=num_classes, img_size=(3, 32, 32), init_dataset=init_args.init_bank,
            iterations=init_args.g_steps, lr_g=init_args.lr_g, lr=init_args.lr,
            synthesis_batch_size=init_args.synthesis_batch_size, sample_batch_size=init_args.batch_size,
            epochs=init_args.epochs, adv=init_args.adv, csd=init_args.csd, bn=init_args.bn, oh=init_args.oh,
            save_dir=init_args.save_dir, transform=transform, dataset=init_args.dataset, normalizer=normalizer,
            device=cpu)
        for _ in range(init_rounds):
            with rec.phase("init"):  # not a phase summary() reads: there only for whoever wants the bank's cost
                init_synth.synthesize()
                init_synth.reset_head()
        for h in init_synth.hooks:
            h.remove()
        del init_synth

        synthesizer = datafree.synthesis.CSDSynthesizer(
            teacher=t_model, student=student, generator=generator, nz=nz, num_classes=num_classes,
            img_size=(3, 32, 32), init_dataset=args.init_bank, iterations=args.g_steps, lr_g=args.lr_g,
            lr=args.lr, synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
            epochs=args.epochs, adv=args.adv, csd=args.csd, bn=args.bn, oh=args.oh, save_dir=args.save_dir,
            transform=transform, dataset=args.dataset, normalizer=args.normalizer, device=cpu)
        optimizer = torch.optim.SGD([{"params": student.parameters()}, {"params": alignhead.parameters()}],
                                    args.lr, weight_decay=args.weight_decay, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

        for r in range(rounds):
            args.current_epoch = r
            with rec.phase("synth"):
                synthesizer.synthesize()
                synthesizer.reset_head()
            with rec.phase("student"):
                if args.run_kd:
                    script.train(synthesizer, [student, t_model], criterion, optimizer, args, alignhead)
            scheduler.step()
        n_cuda = len(cuda_calls)
        bank_images = sum(len(files) for _, _, files in os.walk(workdir / args.init_bank))

    settings = {
        "teacher": args.teacher, "student": args.student, "synthesis_batch": args.synthesis_batch_size,
        "g_steps": args.g_steps, "kd_steps": args.kd_steps, "batch_size": args.batch_size, "rounds": rounds,
        "rounds_per_epoch": 1, "epochs": args.epochs, "lr": args.lr, "lr_g": args.lr_g, "T": args.T,
        "csd": args.csd, "adv": args.adv, "bn": args.bn, "oh": args.oh, "fea": args.fea, "head_lr": args.lr,
        "seed": args.seed, "run_kd": args.run_kd, "init_rounds": init_rounds, "init_g_steps": init_g_steps,
        "init_synthesis_batch": init_args.synthesis_batch_size, "init_csd": init_args.csd,
        "init_bank_images": bank_images, "synthesis_num_workers": _SYNTH_WORKERS, "device": "cpu",
        "dtype": "float32", "save_dir": str(workdir / args.save_dir), "init_bank": str(workdir / args.init_bank),
        "teacher_weights": str(teacher),
    }
    notes = [
        "imported datafree_kd.py as a module with sys.argv = the published script's flags (it parses at module "
        "level, l.123); repeated main_worker()'s set-up for --method csd with their classes; timed calls are "
        "their synthesize(), reset_head() and train() (with train_head() after each student step) unchanged",
        "CPU: args.gpu = None (their CPU branch), synthesizer device=cpu, main_worker's .to(args.gpu) as "
        f".to(cpu); Tensor/Module.cuda identity as a net: {n_cuda} calls hit it",
        "CIFAR-10 not loaded: get_dataset ran with a dataset stand-in that keeps only the train transform",
        f"initial bank: {bank_images} images from {init_rounds} round(s) x {init_g_steps} step(s) of their "
        f"synthesizer at csd 0, not 400 x 500 x 200 (80,000 images): each main round re-lists the bank "
        "(LabeledImageDataset), so at published size a round also lists ~80k files",
        "per-epoch test-set evaluations (student and rotation head), image dump and checkpoint left out (not timed)",
        "DDA's diffusion augmentation is not in the released code (paper step 2); this times CSD synthesis and "
        "student training only",
        "teacher weights from `teacher` (random unless trained): CSD's control flow does not depend on them",
    ]
    if stubbed:
        notes.append("stubbed in sys.modules (missing here): " + "; ".join(stubbed))
    if not pub["pair_published"]:
        notes.append("pair not published in the repository's scripts: the WRN-40-2 -> WRN-16-1 script's flags with "
                     "--teacher/--student changed")
    if batch is not None or synthesis_batch is not None:
        notes.append(f"batch sizes overridden (batch={batch}, synthesis_batch={synthesis_batch}): not the "
                     "published run")
    if g_steps != pub["g_steps"] or kd_steps != pub["kd_steps"]:
        notes.append(f"g_steps {g_steps} / kd_steps {kd_steps} instead of {pub['g_steps']} / {pub['kd_steps']}: "
                     "extrapolate")
    return {"repo": REPO, "method": METHODS[method], "pair": pair, "settings": settings, "published": pub,
            "notes": notes, "cuda_calls_intercepted": n_cuda}
