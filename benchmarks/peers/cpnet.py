"""Peer adapter for CPNet (LannCX/CPNet, ICCV 2025): the authors' code, run where it lies, on the CPU.

CPNet is NAYER's code base with a new synthesizer (``datafree/synthesis/cpnet.py``, ``CoupledSynthesizer``) and
generator (``CoupledGenerator``, shaped after the teacher by ``get_cfg``). Nothing of theirs is copied here: the
adapter imports their ``datafree``, ``registry`` and ``datafree_kd`` from the checkout, parses the published
command (``cpnet_100.sh``) with their own parser and builds what ``datafree_kd.main_worker`` builds for
``--method cpnet``, then calls their ``synthesize()`` and their ``train()``. The generic machinery (imports,
stubs, the ``.cuda()`` identity, the CIFAR-10 transform, the label embedding, the pool prefill) is shared with
:mod:`nayer`, whose docstring explains each piece.

Beyond that, the released code needs two things to run at all on a CPU, both applied without editing a file:

* ``CoupledSynthesizer.synthesize`` logs ``loss_dis.item()`` (cpnet.py:188), a name that is defined nowhere:
  the released synthesizer raises ``NameError`` at its first generator step on any device. The adapter binds
  ``loss_dis`` in that module's globals to a zero tensor for the duration of :func:`run`; it only feeds an
  ``AverageMeter`` for a log line, so the computation is untouched.
* ``CoupledGenerator`` files its intermediate maps under ``targets.device.index`` and ``syn_img_list`` reads them
  back as ``syn_dict[0] .. syn_dict[n-1]`` (GPU indices). A CPU tensor's device index is ``None``; the adapter
  wraps ``syn_img_list`` to move the ``None`` entry to key ``0`` before calling theirs. Restored on exit.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # imported as peers.cpnet (the benchmark) or as cpnet with benchmarks/peers on sys.path
    from . import nayer as base
except ImportError:  # pragma: no cover
    import nayer as base  # type: ignore[no-redef]


try:  # imported as peers.X (the benchmark) or with benchmarks/peers on sys.path
    from . import shim
except ImportError:  # pragma: no cover
    import shim  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .timing import Recorder

REPO: str = "CPNet"
METHODS: dict[str, str] = {"cpnet": "cpnet"}
PAIRS = base.PAIRS
TAGS = base.TAGS

SCRIPT = "cpnet_100.sh"  # 120 epochs with warm-up; cpnet_300.sh differs in --epochs (320) and --save_dir only
_SCRIPT_LINES = {"r34_r18": "36-40", "w402_w162": "48-52"}
_SCRIPT_300_LINES = {"r34_r18": "34-38", "w402_w162": "52-56"}


def published(method: str, pair: str) -> dict[str, Any]:
    """The authors' published CIFAR-10 settings for ``(method, pair)``.

    Read off ``cpnet_100.sh`` (the command) and ``datafree_kd.py`` (parser defaults the command leaves alone);
    :func:`run` re-reads the script from the checkout and refuses to run if they disagree. Both pairs share every
    setting. As in NAYER, their epoch loop calls ``synthesize()`` once per epoch and each call runs ``g_loops``
    loops of ``g_steps`` generator steps: ``rounds_per_epoch`` is 1 and ``g_steps_per_round`` is
    ``g_loops * g_steps``.
    """
    if method not in METHODS:
        raise ValueError(f"{REPO} has no method {method!r} (has {sorted(METHODS)})")
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r} (known: {sorted(PAIRS)})")
    teacher, student = PAIRS[pair]
    return {
        "source": f"{REPO}/{SCRIPT}:{_SCRIPT_LINES[pair]} (# {TAGS[pair]}); defaults from {REPO}/datafree_kd.py "
        "(--kd_steps :81, --T :79, --bn_mmt :43, --le_emb_size :64, --wd :130, --eta_min :77, --sche cos :53); "
        "SGD and cosine schedule datafree_kd.py:397-401; generator Adam betas (0.5, 0.999) "
        "datafree/synthesis/cpnet.py:135-142; cutmix on (synthesize(use_cutmix=True), cpnet.py:90); "
        "one synthesize() per epoch datafree_kd.py:448",
        "dataset": "cifar10",
        "teacher": teacher,
        "student": student,
        "synthesis_batch": 400,
        "g_steps": 30,
        "kd_steps": 400,  # not on the command line: parser default
        "batch_size": 512,
        "rounds_per_epoch": 1,  # synthesize() calls per post-warm-up epoch
        "g_loops": 2,  # generator loops inside one post-warm-up synthesize() call
        "g_steps_per_round": 2 * 30,
        "warmup": 20,
        "warmup_rounds_per_epoch": 1,
        "gwp_loops": 10,
        "epochs": 120,  # total, warm-up included
        "epochs_other_scripts": {"cpnet_300.sh": 320},
        "epochs_other_source": f"{REPO}/cpnet_300.sh:{_SCRIPT_300_LINES[pair]}",
        "lr_g": 4e-3,
        "g_life": 10,
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "eta_min": 2e-4,
        "adv": 1.33,
        "bn": 10.0,
        "oh": 0.5,
        "dist": 0.0,  # passed by the script, but CoupledSynthesizer never reads self.dist (see run()'s notes)
        "T": 20.0,
        "bn_mmt": 0.9,
        "le_emb_size": 1000,
        "pool_loader_workers": 4,  # hard-coded in cpnet.py:209
    }


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0) -> None:
    """Build their teacher for ``pair`` through their own ``registry.get_model`` after ``torch.manual_seed(seed)``
    and save ``{'state_dict': ...}``, the layout their ``datafree_kd.py`` loads for CIFAR.

    Random weights: speed does not depend on them (their README points to NAYER's Dropbox teachers)."""
    base.export_teacher_with(repo, pair, out, seed)


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None, *, steady: bool = True) -> dict[str, Any]:
    """Time CPNet's post-warm-up epochs as their ``datafree_kd.py`` runs them, on the CPU.

    Builds exactly what ``main_worker`` builds for ``--method cpnet`` on CIFAR-10 from the published command
    (read from ``cpnet_100.sh``): ``get_cfg`` on the teacher, ``CoupledGenerator``, ``CoupledSynthesizer``,
    ``KLDiv``, SGD and the cosine schedule. Except: CPU device, ``g_steps`` generator steps per loop,
    ``kd_steps`` student steps per ``train()`` call, teacher weights from ``teacher``, and every batch size set
    to ``batch`` when given (smoke tests). Then ``rounds`` times: ``synthesize()`` in phase ``synth`` (one call =
    one epoch's synthesis = ``g_loops`` loops) and their ``train()`` in phase ``student``.

    ``steady`` (default): the pool first gets what the 20 warm-up epochs leave in it (:func:`nayer.prefill_pool`),
    untimed; ``steady=False`` starts from an empty pool.

    Returns the settings used and notes on what was stubbed, patched or differs from the published run."""
    import torch

    if method not in METHODS:
        raise ValueError(f"{REPO} has no method {method!r}")
    repo, workdir, teacher = Path(repo).resolve(), Path(workdir).resolve(), Path(teacher).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pub = published(method, pair)
    device = torch.device("cpu")
    datafree, registry, dkd, args, argv, line, stubbed = base.prepare(
        repo, SCRIPT, pair, METHODS[method], pub, g_steps, kd_steps, batch)
    base.check_published(args, pub, {"dist": "dist"})
    gen_mod = datafree.models.generator
    syn_mod = datafree.synthesis.cpnet
    their_syn_img_list = gen_mod.CoupledGenerator.syn_img_list

    def syn_img_list(self: Any) -> Any:
        """Theirs, after filing the CPU maps (device index None) under the index 0 their loop reads."""
        if None in self.syn_dict:
            self.syn_dict[0] = self.syn_dict.pop(None)
        return their_syn_img_list(self)

    gen_mod.CoupledGenerator.syn_img_list = syn_img_list
    syn_mod.loss_dis = torch.zeros(())  # cpnet.py:188 logs loss_dis.item(); the name is defined nowhere
    try:
        with shim.cuda_is_identity(), shim.in_dir(workdir):
            shutil.rmtree(args.save_dir, ignore_errors=True)  # their main() does rm -rf save_dir too
            random.seed(args.seed)
            torch.manual_seed(args.seed)
            transform = base.cifar10_transform(registry)
            t, student = base.teacher_student(registry, args, teacher)
            args.normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT[args.dataset])
            criterion = datafree.criterions.KLDiv(T=args.T)
            label_emb, emb_note = base.load_label_emb(repo, args.dataset)
            label_emb = label_emb.to(device).float()
            img_size = (3, 32, 32)
            cfg_list, init_size, bn_nodes = gen_mod.get_cfg(t, img_size=img_size, net_name=args.teacher)
            generator = gen_mod.CoupledGenerator(cfg_list, init_size=init_size, n_classes=args.num_classes,
                                                 le_emb_size=args.le_emb_size, label_emb=label_emb,
                                                 sbz=args.synthesis_batch_size)
            synthesizer = datafree.synthesis.CoupledSynthesizer(
                t, student, generator, num_classes=args.num_classes, img_size=img_size, bn_nodes=bn_nodes,
                save_dir=args.save_dir, device=device, transform=transform, normalizer=args.normalizer,
                synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
                g_steps=args.g_steps, warmup=args.warmup, lr_g=args.lr_g, adv=args.adv, bn=args.bn, oh=args.oh,
                dist=args.dist, bn_mmt=args.bn_mmt, dataset=args.dataset, g_life=args.g_life,
                g_loops=args.g_loops, gwp_loops=args.gwp_loops)
            optimizer = torch.optim.SGD(student.parameters(), args.lr, weight_decay=args.weight_decay,
                                        momentum=0.9)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(args.epochs - args.warmup),
                                                                   eta_min=args.eta_min)
            n_gen = sum(p.numel() for p in synthesizer.generator.parameters() if p.requires_grad)
            prefilled = 0
            if steady:
                targets, _ = synthesizer.generate_ys(cr=0.0)
                with torch.no_grad():
                    images = synthesizer.generator(targets.to(device))
                synthesizer.generator.syn_dict = {}  # what their syn_img_list leaves after reading the maps
                prefilled = base.prefill_pool(synthesizer, args, images)
            base.epoch_regime(rec, synthesizer, dkd, args, [student, t], criterion, optimizer, scheduler, rounds)
            pool = workdir / args.save_dir
            pool_images = sum(1 for _ in pool.glob("*.png"))
    finally:
        gen_mod.CoupledGenerator.syn_img_list = their_syn_img_list
        del syn_mod.loss_dis

    notes = [
        f"published command: {SCRIPT}:{line} ({TAGS[pair]}), parsed by their datafree_kd.parser",
        "NOT RUNNABLE AS RELEASED: CoupledSynthesizer.synthesize logs loss_dis.item() (cpnet.py:188), a name "
        "defined nowhere, so it raises NameError at the first generator step on any device; the adapter binds "
        "loss_dis = torch.zeros(()) in that module's globals (it only feeds a log line's AverageMeter)",
        "CPU: CoupledGenerator.syn_img_list reads syn_dict[0..n-1] (GPU indices) but CPU tensors file under "
        "device index None; wrapped to move the None entry to 0 before their function runs",
        "CPU: torch.Tensor.cuda / nn.Module.cuda patched to identity (get_cfg's probe input, "
        "CoupledGenerator.reinit, DeepInversionHook.syn_values and syn_img_list's per-step .cuda(), train()'s "
        "images.cuda()); synthesizer device=cpu; args.gpu=0 so train() takes their .cuda() branch",
        f"label embedding: {emb_note}",
        f"stubbed (not installed, never called on this path): {', '.join(stubbed) or 'nothing'}",
        "registry.get_dataset('cifar10') run with torchvision's CIFAR10 swapped for a transform holder "
        "(no download); their pool is read through that train transform",
        "teacher weights: random (export_teacher), loaded from the given file instead of checkpoints/pretrained",
        "--dist (0.0 in the published command) is stored by CoupledSynthesizer but never read: the feature "
        "distance term (compute_dis) is always added to the adversarial loss with weight adv",
        "warm-up skipped: synthesizer.ep set to warmup, so every call is a post-warm-up epoch (g_loops loops, "
        "cutmix, student forward, adversarial and distance terms on); the generator re-initialisation every "
        "g_life epochs falls on the first call, as at the real epoch 20",
        (f"pool prefilled (untimed) with {prefilled} batches of {args.synthesis_batch_size} images from their "
         "untrained generator, through their ImagePool.add: what the warm-up leaves" if steady else
         "pool starts empty (steady=False): the student loader wraps, and re-forks its 4 workers, every few steps"),
        "kd_steps=400 at 512 per batch ends a pass over the 80k-image pool (157 batches) two or three times per real "
        "epoch, forking the loader's 4 workers again each time; a timed train() call of a few steps reaches none",
        "their per-epoch test-set evaluation, checkpoint save, wandb logging and warm-up epochs are not run",
        "their code prints a loss line to stdout after every generator loop",
    ]
    if batch is not None:
        notes.append(f"batch={batch}: synthesis and student batch sizes replaced (smoke test); CoupledGenerator "
                     f"then has ceil({batch}/10) noisy layers instead of 40")
    return {
        "repo": REPO, "method": method, "their_method": METHODS[method], "pair": pair, "argv": argv,
        "teacher": args.teacher, "student": args.student, "synthesis_batch": args.synthesis_batch_size,
        "batch_size": args.batch_size, "g_steps": args.g_steps, "g_loops": args.g_loops,
        "g_steps_per_round": args.g_loops * args.g_steps, "kd_steps": args.kd_steps, "rounds": rounds,
        "lr_g": args.lr_g, "adv": args.adv, "bn": args.bn, "oh": args.oh, "dist": args.dist, "T": args.T,
        "bn_mmt": args.bn_mmt, "g_life": args.g_life, "warmup": args.warmup, "lr": args.lr,
        "le_emb_size": args.le_emb_size, "generator_cfg": cfg_list, "generator_init_size": init_size,
        "bn_nodes": bn_nodes, "generator_params": n_gen, "pool": str(pool), "pool_images": pool_images,
        "steady": steady, "prefilled_batches": prefilled, "device": "cpu", "precision": "fp32",
        "torch_threads": torch.get_num_threads(), "notes": notes,
    }
