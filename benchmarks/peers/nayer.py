"""Peer adapter for NAYER (tmtuan1307/NAYER, CVPR 2024): the authors' code, run where it lies, on the CPU.

Nothing of theirs is copied here. The adapter imports their ``datafree`` package, ``registry.py`` and
``datafree_kd.py`` from the checkout and builds what ``datafree_kd.main_worker`` builds for ``--method nayer``
(teacher, student, ``NLGenerator``, ``datafree.synthesis.NAYER``, ``KLDiv``, the student's SGD and cosine
schedule), then calls their ``synthesize()`` and their ``train()``. The published command is read from their
script (``scripts/nayer_100.sh``) and parsed by their own ``argparse`` parser, so the settings are theirs;
only the ones the benchmark controls are overridden (``g_steps``, ``kd_steps``, the batch sizes for smoke tests).

What CPU execution forces, and nothing else:

* ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` are the identity while :func:`run` executes: their code
  calls ``.cuda()`` unconditionally (``NLGenerator.reinit``, ``train()``'s ``images.cuda(args.gpu)``); on one
  GPU those calls leave an on-device tensor where it is, which is what the identity does on the CPU.
* ``label_embedding/cifar10_le.pickle`` holds a pickled *CUDA* tensor (their CLIP ViT-B/32 text embeddings);
  it is unpickled with its storage mapped to the CPU. The embeddings themselves are theirs, not random.
* Modules they import that are not installed and that the timed path never calls are stubbed in
  ``sys.modules``: ``wandb`` (``datafree_kd.py``'s logging), ``termcolor`` (log colours) and ``xlsxwriter``
  (imported by their unrelated ``fast_meta.py``).
* ``registry.get_dataset('cifar10')`` is called with ``torchvision.datasets.CIFAR10`` swapped for a holder
  that keeps the transform and loads nothing: their pool is read back through CIFAR-10's *train transform*
  (``ori_dataset.transform``), and that is all ``main_worker`` takes from the data set besides the evaluator.

Both NAYER and CPNet ship top-level modules named ``datafree``, ``registry`` and ``datafree_kd``; the adapter
drops any previously imported copies before importing its own, but a benchmark should still run each peer in a
process of its own. The helpers below are reused by :mod:`cpnet` (CPNet is built on this code base).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import logging
import os
import pickle
import random
import shlex
import shutil
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # imported as peers.X (the benchmark) or with benchmarks/peers on sys.path
    from . import shim
except ImportError:  # pragma: no cover
    import shim  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .timing import Recorder

REPO: str = "NAYER"
METHODS: dict[str, str] = {"nayer": "nayer"}

#: dfkd pair name -> (their teacher, their student) model names in ``registry.MODEL_DICT``.
PAIRS: dict[str, tuple[str, str]] = {"r34_r18": ("resnet34", "resnet18"), "w402_w162": ("wrn40_2", "wrn16_2")}
#: dfkd pair name -> the comment tag that heads the CIFAR-10 command in their scripts.
TAGS: dict[str, str] = {"r34_r18": "c10r34r18", "w402_w162": "c10w402w162"}

SCRIPT = "scripts/nayer_100.sh"  # the 100-epoch (120 with warm-up) commands; the README's example is this one
_SCRIPT_LINES = {"r34_r18": "38-42", "w402_w162": "50-54"}
_TOP_MODULES = ("datafree", "registry", "datafree_kd")


def published(method: str, pair: str) -> dict[str, Any]:
    """The authors' published CIFAR-10 settings for ``(method, pair)``.

    Read off ``scripts/nayer_100.sh`` (the command) and ``datafree_kd.py`` (the parser defaults the command
    leaves alone); :func:`run` re-reads the script from the checkout and refuses to run if they disagree.
    ``nayer_200.sh`` and ``nayer_300.sh`` differ only in ``--epochs`` (220, 320). Both pairs share every
    setting; only the networks differ.

    A *round* here is one ``synthesize()`` call, and their epoch loop makes exactly one per epoch; inside it the
    synthesizer runs ``g_loops`` (2) independent loops of ``g_steps`` generator steps, each adding one batch of
    ``synthesis_batch`` images to the pool. Hence ``rounds_per_epoch`` is 1 and ``g_steps_per_round`` is
    ``g_loops * g_steps``: extrapolating a round to the published ``g_steps`` must scale the generator-step
    difference by ``g_loops``.
    """
    if method not in METHODS:
        raise ValueError(f"{REPO} has no method {method!r} (has {sorted(METHODS)})")
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r} (known: {sorted(PAIRS)})")
    teacher, student = PAIRS[pair]
    return {
        "source": f"{REPO}/{SCRIPT}:{_SCRIPT_LINES[pair]} (# {TAGS[pair]}); defaults from {REPO}/datafree_kd.py "
        "(--kd_steps :75, --T :73, --bn_mmt :41, --le_emb_size :58, --wd :124, --eta_min :71); "
        "SGD momentum and cosine schedule datafree_kd.py:336-338; generator Adam betas (0.5, 0.999) "
        "datafree/synthesis/nayer.py:180-182; one synthesize() per epoch datafree_kd.py:382",
        "dataset": "cifar10",
        "teacher": teacher,
        "student": student,
        "synthesis_batch": 400,
        "g_steps": 30,  # the explicit CIFAR-10 lines say 30; the script's header ("modify --dataset and nothing
        # else to apply to CIFAR10") would give CIFAR-100's 40. The explicit lines are taken.
        "kd_steps": 400,  # not on the command line: parser default
        "batch_size": 512,
        "rounds_per_epoch": 1,  # synthesize() calls per post-warm-up epoch
        "g_loops": 2,  # generator loops inside one post-warm-up synthesize() call
        "g_steps_per_round": 2 * 30,
        "warmup": 20,
        "warmup_rounds_per_epoch": 1,
        "gwp_loops": 10,  # loops per synthesize() call during warm-up (no student training, no adversarial term)
        "epochs": 120,  # total, warm-up included: 100 epochs of distillation
        "epochs_other_scripts": {"scripts/nayer_200.sh": 220, "scripts/nayer_300.sh": 320},
        "lr_g": 4e-3,
        "g_life": 10,  # the whole generator is re-initialised every g_life epochs
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "eta_min": 2e-4,
        "adv": 1.33,
        "bn": 10.0,
        "oh": 0.5,
        "T": 20.0,
        "bn_mmt": 0.9,
        "le_emb_size": 1000,
        "ngf": 64,
        "pool_loader_workers": 4,  # hard-coded in nayer.py:239-241
    }


# -- helpers shared with cpnet.py ------------------------------------------------------------------------------


def stub_missing(names: dict[str, dict[str, Any]]) -> list[str]:
    """Put an empty module in ``sys.modules`` for each name that is not installed; return the names stubbed.

    Only for imports the timed path never calls into (logging, spreadsheets); an installed module is left alone,
    so a checkout run where those packages exist is unaffected. Stubs put in place by an earlier call (say, by
    :func:`export_teacher` in the same process) are reported again."""
    stubbed = []
    for name, attrs in names.items():
        if getattr(sys.modules.get(name), "__peer_stub__", False):
            stubbed.append(name)
            continue
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mod.__peer_stub__ = True  # type: ignore[attr-defined]
        sys.modules[name] = mod
        stubbed.append(name)
    return stubbed


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


#: What both repositories import but never use on the timed path.
COMMON_STUBS: dict[str, dict[str, Any]] = {
    "wandb": {"init": _noop, "log": _noop},
    "termcolor": {"colored": lambda text, *args, **kwargs: text},
    "xlsxwriter": {},
}


def import_repo(repo: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType, list[str]]:
    """Import ``datafree``, ``registry`` and ``datafree_kd`` from ``repo`` as released; also return the modules
    that had to be stubbed (:data:`COMMON_STUBS` that are not installed).

    Copies imported from another checkout (NAYER and CPNet use the same names) are dropped first, and
    ``dfkd_common.tvguard`` runs before anything imports torchvision (the CPU torch / CUDA torchvision pair)."""
    import dfkd_common.tvguard  # noqa: F401  (must precede the first torchvision import)

    stubbed = stub_missing(COMMON_STUBS)

    repo = repo.resolve()
    for name in list(sys.modules):
        if name.split(".")[0] in _TOP_MODULES:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if not Path(file).resolve().is_relative_to(repo):
                del sys.modules[name]
    if str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    wandb_mode = os.environ.get("WANDB_MODE")
    datafree, registry, dkd = (importlib.import_module(n) for n in _TOP_MODULES)
    if wandb_mode is None:  # CPNet's datafree_kd.py sets WANDB_MODE=offline at import; keep the process clean
        os.environ.pop("WANDB_MODE", None)
    return datafree, registry, dkd, stubbed


def script_command(script: Path, tag: str) -> tuple[list[str], int]:
    """The arguments of the ``datafree_kd.py`` command under ``# <tag>`` in one of their shell scripts, and the
    1-based line where the command starts (continuation lines joined; redirections and ``&`` dropped)."""
    lines = script.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in (f"# {tag}", f"#{tag}", tag))
    except StopIteration:
        raise ValueError(f"no '# {tag}' block in {script}") from None
    first = next(i for i in range(start + 1, len(lines)) if "datafree_kd.py" in lines[i])
    text, i = "", first
    while True:
        line = lines[i].rstrip()
        text += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            break
        i += 1
    tokens = shlex.split(text)
    tokens = tokens[tokens.index(next(t for t in tokens if t.endswith("datafree_kd.py"))) + 1 :]
    out = []
    for tok in tokens:
        if tok.startswith(">") or tok.startswith("2>") or tok == "&":
            break
        out.append(tok)
    return out, first + 1


def drop_option(argv: list[str], option: str) -> tuple[list[str], str | None]:
    """``argv`` without ``option`` and its value, and that value."""
    if option not in argv:
        return argv, None
    i = argv.index(option)
    return argv[:i] + argv[i + 2 :], argv[i + 1]


def check_published(args: argparse.Namespace, pub: dict[str, Any], keys: dict[str, str]) -> None:
    """Refuse to time a checkout whose script no longer says what :func:`published` reports."""
    bad = {k: (getattr(args, a), pub[k]) for k, a in keys.items() if getattr(args, a) != pub[k]}
    if bad:
        raise RuntimeError(f"script settings differ from published(): {bad} (script, published)")


PUBLISHED_KEYS = {"synthesis_batch": "synthesis_batch_size", "g_steps": "g_steps", "kd_steps": "kd_steps",
                  "batch_size": "batch_size", "g_loops": "g_loops", "gwp_loops": "gwp_loops", "epochs": "epochs",
                  "warmup": "warmup", "lr_g": "lr_g", "g_life": "g_life", "lr": "lr", "adv": "adv", "bn": "bn",
                  "oh": "oh", "T": "T", "bn_mmt": "bn_mmt", "le_emb_size": "le_emb_size",
                  "teacher": "teacher", "student": "student", "dataset": "dataset"}


class _TransformOnly:
    """Stands in for ``torchvision.datasets.CIFAR10`` inside ``registry.get_dataset``: keeps the transform
    their code builds, downloads and loads nothing."""

    def __init__(self, root: str, train: bool = True, download: bool = False, transform: Any = None,
                 **kwargs: Any) -> None:
        self.root, self.train, self.transform = root, train, transform


def cifar10_transform(registry: types.ModuleType) -> Any:
    """CIFAR-10's train transform as their ``registry.get_dataset`` builds it (their pool is read through it)."""
    datasets = registry.datasets
    saved = datasets.CIFAR10
    datasets.CIFAR10 = _TransformOnly
    try:
        num_classes, train_dst, _ = registry.get_dataset(name="cifar10", data_root="data")
    finally:
        datasets.CIFAR10 = saved
    assert num_classes == 10
    return train_dst.transform


def load_label_emb(repo: Path, dataset: str) -> tuple[Any, str]:
    """Their label-text embedding (``label_embedding/<dataset>_le.pickle``, CLIP ViT-B/32 text features) on the
    CPU, and a note saying where it came from.

    The pickle holds a CUDA tensor; its storage is mapped to the CPU while unpickling. Only if the file is
    missing is a same-shaped random tensor used (10 x 512 for CIFAR-10), and the note says so."""
    import torch
    import torch.storage

    path = repo / "label_embedding" / f"{dataset}_le.pickle"
    if not path.is_file():
        torch.manual_seed(0)
        return torch.randn(10, 512), f"{path.name} missing: random 10x512 label embedding in its place"
    saved = torch.storage._load_from_bytes

    def cpu_load(b: bytes) -> Any:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)

    torch.storage._load_from_bytes = cpu_load
    try:
        with open(path, "rb") as f:
            emb = pickle.load(f)
    finally:
        torch.storage._load_from_bytes = saved
    return emb, f"their {path.relative_to(repo)} ({tuple(emb.shape)}, stored as a CUDA tensor, mapped to CPU)"


def export_teacher_with(repo: Path, pair: str, out: Path, seed: int) -> None:
    """Shared body of :func:`export_teacher` (their ``registry.get_model``, their classifier code)."""
    import torch

    _, registry, _, _ = import_repo(Path(repo))
    torch.manual_seed(seed)
    model = registry.get_model(PAIRS[pair][0], num_classes=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)


def build_args(dkd: types.ModuleType, datafree: types.ModuleType, argv: list[str], pub: dict[str, Any], method: str,
               g_steps: int, kd_steps: int, batch: int | None) -> argparse.Namespace:
    """Their ``args`` as ``main()``/``main_worker()`` leave it for ``train()``, from their own parser.

    Overrides: ``g_steps``, ``kd_steps``, the batch sizes (smoke tests only), ``gpu=0`` (``train()`` then calls
    ``images.cuda(0)``, the identity under :func:`shim.cuda_is_identity`), fp32 (``dummy_ctx``, their default).
    The parsed
    command is first checked against :func:`published`."""
    args = dkd.parser.parse_args(argv)
    check_published(args, pub, PUBLISHED_KEYS)
    args.method = method
    args.g_steps = g_steps
    args.kd_steps = kd_steps
    if batch is not None:
        args.batch_size = args.synthesis_batch_size = batch
    args.save_dir = args.save_dir + args.log_tag  # as main() does: the pool's folder
    args.gpu = 0
    args.distributed = False
    args.multiprocessing_distributed = False
    args.rank = -1
    args.fp16 = False
    args.autocast = datafree.utils.dummy_ctx
    args.logger = logging.getLogger(f"peer.{method}")  # train() logs only when print_freq != 0 (it is 0)
    args.num_classes = 10
    return args


def teacher_student(registry: types.ModuleType, args: argparse.Namespace, teacher: Path) -> tuple[Any, Any]:
    """Student and teacher as ``main_worker`` builds them (teacher weights from ``teacher``, not their
    ``checkpoints/pretrained``); ``prepare_model`` is the identity without CUDA."""
    import torch

    student = registry.get_model(args.student, num_classes=args.num_classes)
    t = registry.get_model(args.teacher, num_classes=args.num_classes, pretrained=True).eval()
    t.load_state_dict(torch.load(teacher, map_location="cpu")["state_dict"])
    return t, student


def prefill_pool(synthesizer: Any, args: argparse.Namespace, images: Any) -> int:
    """Fill their pool, through their own ``ImagePool.add``, to what the warm-up leaves in it: one batch of
    ``synthesis_batch_size`` images per warm-up loop, ``warmup * gwp_loops`` batches (200 x 400 = 80,000 PNGs
    at the published settings). Returns the number of batches written.

    Why: the student's loader is rebuilt over the whole pool after every loop and its iterator restarts (four
    worker processes forked again) whenever a pass over the pool ends. With only the timed rounds' few batches
    in it, a pass lasts one or two student steps and every other step would pay a restart that the real run,
    with about 157 batches of 512 per pass, pays once per 157 steps. ``images`` is one batch from their
    generator, written ``warmup * gwp_loops`` times (the content does not matter to speed; PNG size roughly
    does)."""
    n = args.warmup * args.gwp_loops
    for _ in range(n):
        synthesizer.data_pool.add(images)
    return n


def epoch_regime(rec: Recorder, synthesizer: Any, dkd: types.ModuleType, args: argparse.Namespace,
                 models: list[Any], criterion: Any, optimizer: Any, scheduler: Any, rounds: int) -> None:
    """Their epoch loop (``datafree_kd.py`` main loop) after warm-up: one ``synthesize()`` then ``train()`` per
    epoch, the schedule stepped at the epoch's end. The per-epoch evaluation and checkpoint save are left out
    (no CIFAR-10 test set here; neither is synthesis or student training)."""
    synthesizer.ep = args.warmup  # the first post-warm-up epoch: g_loops loops, adversarial term on
    for r in range(rounds):
        args.current_epoch = args.warmup + r
        with rec.phase("synth"):
            synthesizer.synthesize()
        with rec.phase("student"):
            dkd.train(synthesizer, models, criterion, optimizer, args)
        scheduler.step()


def prepare(repo: Path, script: str, pair: str, method: str, pub: dict[str, Any], g_steps: int, kd_steps: int,
            batch: int | None,
            ) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType, argparse.Namespace, list[str], int,
                       list[str]]:
    """Import the checkout, read the published command from ``script``, check it against :func:`published` and
    build ``args``; return the three modules, ``args``, the argv parsed, the command's first line and the
    modules stubbed."""
    datafree, registry, dkd, stubbed = import_repo(repo)
    argv, line = script_command(repo / script, TAGS[pair])
    argv, their_method = drop_option(argv, "--method")
    if their_method != method:
        raise RuntimeError(f"{script}: --method {their_method!r}, expected {method!r}")
    args = build_args(dkd, datafree, argv, pub, method, g_steps, kd_steps, batch)
    return datafree, registry, dkd, args, argv, line, stubbed


# -- the adapter -----------------------------------------------------------------------------------------------


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0) -> None:
    """Build their teacher for ``pair`` through their own ``registry.get_model`` after ``torch.manual_seed(seed)``
    and save ``{'state_dict': ...}``, the layout ``datafree_kd.py`` loads from ``checkpoints/pretrained``.

    Random weights: speed does not depend on them, and their pretrained teachers are a Dropbox download."""
    export_teacher_with(repo, pair, out, seed)


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None, *, steady: bool = True) -> dict[str, Any]:
    """Time NAYER's post-warm-up epochs as their ``datafree_kd.py`` runs them, on the CPU.

    Builds exactly what ``main_worker`` builds for ``--method nayer`` on CIFAR-10 from the published command
    (read from ``scripts/nayer_100.sh``), except: CPU device, ``g_steps`` generator steps per loop,
    ``kd_steps`` student steps per ``train()`` call, the teacher's weights from ``teacher`` and, when ``batch``
    is given, every batch size set to it. Then ``rounds`` times: ``synthesize()`` in phase ``synth`` (one
    call = one epoch's synthesis = ``g_loops`` loops) and their ``train()`` in phase ``student``.

    ``steady`` (default): the pool first gets what the 20 warm-up epochs leave in it (:func:`prefill_pool`),
    untimed; ``steady=False`` starts from an empty pool.

    Returns the settings used and notes on what was stubbed or differs from the published run."""
    import torch

    if method not in METHODS:
        raise ValueError(f"{REPO} has no method {method!r}")
    repo, workdir, teacher = Path(repo).resolve(), Path(workdir).resolve(), Path(teacher).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pub = published(method, pair)
    device = torch.device("cpu")
    datafree, registry, dkd, args, argv, line, stubbed = prepare(repo, SCRIPT, pair, METHODS[method], pub, g_steps,
                                                                  kd_steps, batch)
    with shim.cuda_is_identity(), shim.in_dir(workdir):
        shutil.rmtree(args.save_dir, ignore_errors=True)  # a fresh pool, as a fresh run starts with
        random.seed(args.seed)  # main(): seeds before anything is built
        torch.manual_seed(args.seed)
        transform = cifar10_transform(registry)
        t, student = teacher_student(registry, args, teacher)
        args.normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT[args.dataset])
        criterion = datafree.criterions.KLDiv(T=args.T)
        label_emb, emb_note = load_label_emb(repo, args.dataset)
        label_emb = label_emb.to(device).float()
        generator = datafree.models.generator.NLGenerator(
            ngf=64, img_size=32, nc=3, nl=args.num_classes, label_emb=label_emb, le_emb_size=args.le_emb_size,
            sbz=args.synthesis_batch_size)
        synthesizer = datafree.synthesis.NAYER(
            t, student, generator, num_classes=args.num_classes, img_size=(3, 32, 32), init_dataset=args.cmi_init,
            save_dir=args.save_dir, device=device, transform=transform, normalizer=args.normalizer,
            synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
            g_steps=args.g_steps, warmup=args.warmup, lr_g=args.lr_g, adv=args.adv, bn=args.bn, oh=args.oh,
            bn_mmt=args.bn_mmt, g_life=args.g_life, g_loops=args.g_loops, gwp_loops=args.gwp_loops)
        optimizer = torch.optim.SGD(student.parameters(), args.lr, weight_decay=args.weight_decay, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(args.epochs - args.warmup),
                                                               eta_min=args.eta_min)
        n_gen = sum(p.numel() for p in synthesizer.generator.parameters())
        prefilled = 0
        if steady:
            targets, _ = synthesizer.generate_ys(cr=0.0)
            with torch.no_grad():
                images = synthesizer.generator(targets=targets.to(device))
            prefilled = prefill_pool(synthesizer, args, images)
        epoch_regime(rec, synthesizer, dkd, args, [student, t], criterion, optimizer, scheduler, rounds)
        pool = workdir / args.save_dir
        pool_images = sum(1 for _ in pool.glob("*.png"))

    notes = [
        f"published command: {SCRIPT}:{line} ({TAGS[pair]}), parsed by their datafree_kd.parser "
        "without '--method nayer': their parser has choices=['nldf'] (datafree_kd.py:32) and rejects the "
        "published command, so the released script cannot start as written; args.method is set to 'nayer' after",
        "CPU: torch.Tensor.cuda / nn.Module.cuda patched to identity (NLGenerator.reinit, train()'s "
        "images.cuda(args.gpu)); synthesizer device=cpu; args.gpu=0 so train() takes their .cuda() branch",
        f"label embedding: {emb_note}",
        f"stubbed (not installed, never called on this path): {', '.join(stubbed) or 'nothing'}",
        "registry.get_dataset('cifar10') run with torchvision's CIFAR10 swapped for a transform holder "
        "(no download); their pool is read through that train transform",
        "teacher weights: random (export_teacher), loaded from the given file instead of checkpoints/pretrained",
        "warm-up skipped: synthesizer.ep set to warmup, so every call is a post-warm-up epoch (g_loops loops, "
        "student forward and adversarial term on); the generator re-initialisation every g_life epochs falls on "
        "the first call, as at the real epoch 20",
        (f"pool prefilled (untimed) with {prefilled} batches of {args.synthesis_batch_size} images from their "
         "untrained generator, through their ImagePool.add: what the warm-up leaves" if steady else
         "pool starts empty (steady=False): the student loader wraps, and re-forks its 4 workers, every few steps"),
        "kd_steps=400 at 512 per batch ends a pass over the 80k-image pool (157 batches) two or three times per real "
        "epoch, forking the loader's 4 workers again each time; a timed train() call of a few steps reaches none",
        "their per-epoch test-set evaluation, checkpoint save, wandb logging and warm-up epochs are not run",
        "their code prints to stdout on every generator step and the targets of every loop",
    ]
    if batch is not None:
        notes.append(f"batch={batch}: synthesis and student batch sizes replaced (smoke test); NLGenerator then "
                     f"has ceil({batch}/10) noisy layers instead of 40")
    return {
        "repo": REPO, "method": method, "their_method": METHODS[method], "pair": pair, "argv": argv,
        "teacher": args.teacher, "student": args.student, "synthesis_batch": args.synthesis_batch_size,
        "batch_size": args.batch_size, "g_steps": args.g_steps, "g_loops": args.g_loops,
        "g_steps_per_round": args.g_loops * args.g_steps, "kd_steps": args.kd_steps, "rounds": rounds,
        "lr_g": args.lr_g, "adv": args.adv, "bn": args.bn, "oh": args.oh, "T": args.T, "bn_mmt": args.bn_mmt,
        "g_life": args.g_life, "warmup": args.warmup, "lr": args.lr, "le_emb_size": args.le_emb_size,
        "generator_params": n_gen, "pool": str(pool), "pool_images": pool_images, "steady": steady,
        "prefilled_batches": prefilled, "device": "cpu",
        "precision": "fp32", "torch_threads": torch.get_num_threads(), "notes": notes,
    }
