"""Peer adapter: the authors' RGAL (Sharpiless/RGAL, IJCV 2024), run where it lies, for ``bench_vs_reference.py``.

Nothing of theirs is copied here. Their ``main.py`` is imported as a module (its ``main()`` sits behind
``if __name__ == '__main__'``; the parser is module-level and parsing happens only in ``main()``), its ``parser``
parses the README's command line, and the adapter then repeats ``main_worker()``'s set-up statements (lines
151-284) with their classes: ``registry.get_model``, ``datafree.synthesis.AdvTripletSynthesizer``,
``losses.CDLoss``/``GRAMLoss``, the 1x1 ``nn.Conv2d`` alignment layers, the SGD and cosine schedule. It cannot
call ``main_worker()`` itself: that downloads CIFAR-10, writes a log, evaluates on the test set every epoch and
loops for 200 epochs. The timed calls are theirs, unchanged: ``synthesizer.synthesize()`` and ``main.train()``.

What CPU execution needs, and nothing else:

* ``args.gpu = None``: their own CPU branch (``train()`` moves images with ``.cuda(args.gpu)`` only when it is not
  None; ``prepare_model`` returns the model untouched without CUDA); ``device=torch.device('cpu')`` for the
  synthesizer. ``main_worker``'s ``torch.rand(...).cuda()`` and ``nn.Conv2d(...).cuda()`` (lines 260, 266) are
  written here without ``.cuda()``. As a safety net ``Tensor.cuda``/``Module.cuda`` are identity while
  :func:`run` runs; the count of calls that reached them is returned (0 on the paths above).
* CIFAR-10 is never loaded: ``registry.get_dataset`` runs with ``registry.datasets`` swapped for a stand-in whose
  ``CIFAR10`` only keeps its ``transform``: synthesis needs that transform (the bank's augmentation), not the data.
* Modules the released code imports that this environment lacks are stubbed in ``sys.modules`` only when
  missing: ``termcolor`` (their logger; ``colored`` returns the text) and ``torchvision.models.utils`` (removed
  from torchvision; their MobileNetV2, ImageNet ResNet and DeepLab modules import ``load_state_dict_from_url``
  from it at import time), pointed at ``torch.hub.load_state_dict_from_url``.

What random teacher weights need (the one place behaviour can differ from the released run): RGAL labels its
triplets with the teacher's argmax, and a freshly initialised WRN-40-2 or ResNet-34 gives every image the same
label. Their sampler means to skip such a batch (losses.py l.62-63) but crashes first (0/0, then
``torch.multinomial``; an all-distinct batch crashes in ``torch.max`` of an empty tensor). So
:func:`export_teacher` calibrates the random teacher's BN statistics and classifier bias on their generator's
images (labels then follow the image), and :func:`run` lets a batch that is still degenerate take their own
"no negatives" exit, counting how many did (``triplet_sampler`` in the result).

Their top-level module names (``datafree``, ``registry``, ``losses``) are shared with other authors' repositories
(CMI's family): modules of those names loaded from elsewhere are dropped from ``sys.modules`` before the import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import random
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

try:  # imported as peers.X (the benchmark) or with benchmarks/peers on sys.path
    from . import shim
except ImportError:  # pragma: no cover
    import shim  # type: ignore[no-redef]

if TYPE_CHECKING:
    from peers.timing import Recorder

REPO: str = "RGAL"
METHODS: dict[str, str] = {"rgal": "rgal"}  # main.py's AdvTripletSynthesizer path (``--cmi`` off)

# dfkd pair -> their registry names (registry.py MODEL_DICT: CIFAR ResNets from DAFL, WRNs from ZSKT)
PAIRS: dict[str, tuple[str, str]] = {
    "r34_r18": ("resnet34", "resnet18"),
    "w402_w162": ("wrn40_2", "wrn16_2"),
    "w402_w161": ("wrn40_2", "wrn16_1"),
}

# README.md lines 41-74, the only published command (CIFAR-10, WRN-40-2 -> WRN-16-1). Line 74's ``--balance 0.1``
# is not an argument of main.py's parser (argparse exits with "unrecognized arguments"), so it is left out.
README_ARGV: tuple[str, ...] = (
    "--epochs", "200", "--dataset", "cifar10", "--batch_size", "128", "--synthesis_batch_size", "256",
    "--teacher", "wrn40_2", "--student", "wrn16_1", "--lr", "0.1", "--kd_steps", "400", "--ep_steps", "400",
    "--g_steps", "400", "--lr_g", "1e-3", "--adv", "1.0", "--bn", "1.0", "--oh", "1.0", "--act", "0.001",
    "--gpu", "0", "--seed", "0", "--T", "20", "--save_dir", "run/scratch1", "--log_tag", "scratch1",
    "--cd_loss", "0.1", "--gram_loss", "0", "--teacher_weights", "best_model/cifar10_wrn40_2.pth",
    "--custom_steps", "1.0", "--print_freq", "50", "--triplet_target", "student", "--pair_sample",
    "--striplet_feature", "global", "--start_layer", "2", "--triplet", "0.1", "--striplet", "0.1",
    "--balanced_sampling",
)  # fmt: skip
_DROPPED_ARGV = ("--balance", "0.1")
_TOPS = ("datafree", "registry", "losses")  # their top-level module names
_MAIN = "peer_rgal_main"  # the name their main.py is imported under (never plain ``main``)
_SYNTH_WORKERS = 4  # datafree/synthesis/triplet.py: DataLoader(num_workers=4), hard-coded (``--workers`` unused)


def _check(method: str, pair: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{REPO} adapter runs {sorted(METHODS)}, not {method!r}")
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; known: {sorted(PAIRS)}")


def published(method: str, pair: str) -> dict[str, Any]:
    """The authors' published CIFAR-10 settings for (method, pair), read off their README command and main.py's
    parser defaults; ``source`` says where each comes from.

    Only WRN-40-2 -> WRN-16-1 has a published command; the README (line 79) says to change ``--teacher`` and
    ``--student`` for other pairs, so the other pairs get the same flags (``pair_published`` False)."""
    _check(method, pair)
    teacher, student = PAIRS[pair]
    return {
        "source": ("RGAL/README.md lines 41-74 (the 'Run' command; line 74 '--balance 0.1' is rejected by the "
                   "parser and dropped); RGAL/main.py parser defaults lines 20-127 (momentum 0.9 l.115, weight "
                   "decay 1e-4 l.117, end_layer 4 l.49, workers unused); nz 256 / ngf 64 for 32x32: main.py "
                   "l.225-227; one round per epoch: ep_steps // kd_steps, main.py l.331; synthesis loader "
                   "num_workers 4: datafree/synthesis/triplet.py l.154"),
        "pair_published": pair == "w402_w161",
        "teacher": teacher,
        "student": student,
        "dataset": "cifar10",
        "synthesis_batch": 256,
        "g_steps": 400,
        "kd_steps": 400,
        "ep_steps": 400,
        "batch_size": 128,
        # --pair_sample: every bank image comes as two augmented views, train() concatenates them (main.py
        # l.399-400): each student step sees 2 x batch_size images
        "student_images_per_step": 256,
        "rounds_per_epoch": 1,
        "epochs": 200,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "CosineAnnealingLR(T_max=epochs), stepped once per epoch",
        "lr_g": 1e-3,
        "g_betas": (0.5, 0.999),
        "T": 20.0,
        "adv": 1.0,
        "bn": 1.0,
        "oh": 1.0,
        "act": 0.001,  # accepted by the parser, never passed to AdvTripletSynthesizer: no effect
        "triplet": 0.1,
        "striplet": 0.1,
        "cd_loss": 0.1,
        "gram_loss": 0.0,
        "triplet_target": "student",
        "striplet_feature": "global",
        "start_layer": 2,
        "end_layer": 4,
        "pair_sample": True,
        "balanced_sampling": True,
        "custom_steps": 1.0,
        "print_freq": 50,
        "seed": 0,
        "nz": 256,
        "ngf": 64,
        "synthesis_num_workers": _SYNTH_WORKERS,
        "argv": _argv_for(teacher, student),
    }


def _argv_for(teacher: str, student: str) -> list[str]:
    """The README command with ``--teacher``/``--student`` set to the pair (README line 79's instruction)."""
    argv = list(README_ARGV)
    argv[argv.index("--teacher") + 1] = teacher
    argv[argv.index("--student") + 1] = student
    return argv


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
        importlib.import_module("torchvision.models.utils")
    except ImportError:
        mod = types.ModuleType("torchvision.models.utils")
        mod.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        mod.__peer_stub__ = (  # type: ignore[attr-defined]
            "torchvision.models.utils (load_state_dict_from_url = torch.hub's; gone from torchvision)")
        sys.modules["torchvision.models.utils"] = mod
    stubs = (sys.modules.get(name) for name in ("termcolor", "torchvision.models.utils"))
    return [m.__dict__["__peer_stub__"] for m in stubs if m is not None and "__peer_stub__" in m.__dict__]


def _from(mod: types.ModuleType, repo: Path) -> bool:
    f = getattr(mod, "__file__", None)
    return f is not None and Path(f).resolve().is_relative_to(repo)


def _load(repo: Path) -> tuple[types.ModuleType, list[str]]:
    """Import their main.py (as ``peer_rgal_main``) with ``repo`` first on ``sys.path``; return it and the stubs."""
    import dfkd_common.tvguard  # noqa: F401  (before anything imports torchvision)

    repo = repo.resolve()
    stubbed = _stub_missing()
    cached, ours = sys.modules.get(_MAIN), sys.modules.get("datafree")
    if cached is not None and ours is not None and _from(cached, repo) and _from(ours, repo):
        return cached, stubbed
    for name in list(sys.modules):
        if name.split(".")[0] in _TOPS and not _from(sys.modules[name], repo):
            del sys.modules[name]
    while str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    spec = importlib.util.spec_from_file_location(_MAIN, repo / "main.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no main.py in {repo}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MAIN] = mod
    spec.loader.exec_module(mod)
    return mod, stubbed


@contextlib.contextmanager
def _degenerate_guard(losses: types.ModuleType, enabled: bool) -> Iterator[dict[str, int]]:
    """Count the triplet sampler's calls and, when ``enabled``, let a degenerate batch take their own exit.

    Their samplers (losses.py ``BalancedWeighted``/``DistanceWeighted``) mean to return ``(None, None, None)``
    when a batch has no negative (l.62-63; ``TriLoss`` then adds 0, l.133-135), but divide 0 by 0 first and
    then crash in ``torch.multinomial``; a batch without any positive pair crashes in ``torch.max`` of an empty
    tensor. When enabled, such a batch (all labels equal, or all distinct) returns ``(None, None, None)``
    before their code runs: the exit their check was written for. Other batches go through their sampler
    untouched. Yields ``{'calls', 'degenerate'}`` so the caller can say how many steps skipped the triplet term."""
    counts = {"calls": 0, "degenerate": 0}
    originals = {cls: cls.forward for cls in (losses.BalancedWeighted, losses.DistanceWeighted)}

    def wrap(orig: Any) -> Any:
        def forward(self: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> Any:
            counts["calls"] += 1
            n_labels = int(torch.unique(labels).numel())
            if n_labels < 2 or n_labels == labels.numel():
                counts["degenerate"] += 1
                if enabled:
                    return None, None, None
            return orig(self, embeddings, labels)

        return forward

    for cls, orig in originals.items():
        cls.forward = wrap(orig)
    try:
        yield counts
    finally:
        for cls, orig in originals.items():
            cls.forward = orig


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0, *, calibrate: bool = True) -> None:
    """Build their teacher for ``pair`` with their ``registry.get_model`` (as main.py l.201-202 does) from
    ``torch.manual_seed(seed)`` and save ``{'state_dict': ...}``, the layout main.py l.210-211 loads.

    ``calibrate`` (default) then fits what a random teacher lacks and RGAL's released code cannot do without:
    predictions that differ between images. A freshly initialised WRN-40-2 or ResNet-34 gives every image the
    same argmax; RGAL labels its triplets with the teacher's argmax, and its sampler (losses.py l.40-65) then has
    no negative and dies in ``torch.multinomial`` at the first synthesis step. Calibration, with no gradient:
    BatchNorm running statistics set to the mean over batches of their generator's images at the synthesis
    start (their ``Generator``, ``reset_model`` init, z ~ N(0, 1), their normaliser), then the classifier's
    bias shifted by minus the mean logit over the same images, so the argmax follows the image. Conv and linear
    weights stay as initialised; cost per step does not depend on them, but the label spread sets how many
    triplets each step forms, so give the other contender the same file."""
    _check("rgal", pair)
    main, _ = _load(Path(repo))
    torch.manual_seed(seed)
    model = main.registry.get_model(PAIRS[pair][0], num_classes=10, pretrained=True)
    if calibrate:
        _calibrate(model, main, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)


def _calibrate(model: nn.Module, main: types.ModuleType, seed: int, batches: int = 2, size: int = 64) -> None:
    """BN statistics and classifier bias of a random ``model`` fitted to their generator's initial images."""
    datafree, registry = main.datafree, main.registry
    reset_model = sys.modules["datafree.synthesis.triplet"].reset_model
    normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT["cifar10"])
    gen = torch.Generator().manual_seed(seed)
    generator = datafree.models.generator.Generator(nz=256, ngf=64, img_size=32, nc=3)
    images = []
    with torch.no_grad():
        for _ in range(batches):
            reset_model(generator)
            images.append(normalizer(generator(torch.randn(size, 256, generator=gen))))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for x in images:
            model(x)
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()
        mean_logit = torch.cat([model(x) for x in images]).mean(0)
        fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        fc.bias -= mean_logit


def _readme_argv(repo: Path) -> list[str] | None:
    """The command in this checkout's README (tokens after ``python main.py``), to check it is the one cited."""
    try:
        text = (repo / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    start = text.find("python main.py")
    if start < 0:
        return None
    block = text[start:].split("```", 1)[0]
    return block.replace("\\\n", " ").split()[2:]


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None, *, synthesis_batch: int | None = None,
        guard: bool = True) -> dict[str, Any]:
    """Run ``rounds`` RGAL epochs (one synthesis round, then ``kd_steps`` student steps) with their code.

    Built as main.py's ``main()``/``main_worker()`` builds them at the README's settings (seeding l.133-137,
    models l.200-213, synthesizer l.229-242, CD/GRAM heads l.260-270, SGD + cosine l.277-284), except: CPU,
    ``iterations=g_steps``, ``args.kd_steps = kd_steps``, teacher weights from ``teacher``, ``batch`` (smoke tests)
    replacing the student and synthesis batch sizes, ``synthesis_batch`` (keyword) the synthesis batch alone.
    cwd is ``workdir``; their pool ``run/scratch1`` there is emptied first (a stale pool would change what each
    round re-reads). RGAL has no initial bank: every epoch is the main-phase regime. Per round, as their loop
    (l.327-350) does: ``synthesize()`` in phase ``synth``, ``train(...)`` in phase ``student``, then
    ``scheduler.step()`` (their per-epoch evaluation and checkpoint are left out: neither is timed).

    ``guard`` (keyword, default on): a batch whose teacher labels are all equal or all distinct takes the
    triplet sampler's own "no negatives" exit instead of crashing (:func:`_degenerate_guard`); how many did is
    returned (``triplet_sampler``). With a trained teacher and published batches none should; with a random one
    use ``export_teacher(calibrate=True)`` so that few do and the steps time the triplet term."""
    _check(method, pair)
    repo, teacher, workdir = Path(repo).resolve(), Path(teacher).resolve(), Path(workdir).resolve()
    pub = published(method, pair)
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with shim.in_dir(workdir), shim.cuda_is_identity() as cuda_calls:
        main, stubbed = _load(repo)
        datafree, registry = main.datafree, main.registry
        found = _readme_argv(repo)
        if found is not None and found != [*README_ARGV, *_DROPPED_ARGV]:
            notes.append(f"this checkout's README command differs from the one cited: {found}")

        args = main.parser.parse_args(pub["argv"])
        # main(): seeding (l.133-137)
        np.random.seed(args.seed)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = True
        # main_worker(): CPU, fp32
        args.gpu = None
        args.autocast = datafree.utils.dummy_ctx
        args.g_steps = g_steps
        args.kd_steps = kd_steps
        args.ep_steps = kd_steps  # keeps ep_steps // kd_steps == 1 round per epoch, as published (400 // 400)
        if batch is not None:
            args.batch_size = batch
            args.synthesis_batch_size = batch
        if synthesis_batch is not None:
            args.synthesis_batch_size = synthesis_batch
        args.teacher_weights = str(teacher)
        shutil.rmtree(workdir / args.save_dir, ignore_errors=True)

        num_classes = 10
        transform = shim.train_transform(registry, args.dataset)
        student = registry.get_model(args.student, num_classes=num_classes, pretrained=args.pretrained)
        t_model = registry.get_model(args.teacher, num_classes=num_classes, pretrained=True).eval()
        args.normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT[args.dataset])
        t_model.load_state_dict(torch.load(args.teacher_weights, map_location="cpu")["state_dict"])
        criterion = datafree.criterions.KLDiv(T=args.T)
        if args.synthesis_batch_size is None:
            args.synthesis_batch_size = args.batch_size
        img_size, nz, ngf = 32, 256, 64
        generator = datafree.models.generator.Generator(nz=nz, ngf=ngf, img_size=img_size, nc=3)
        synthesizer = datafree.synthesis.AdvTripletSynthesizer(
            t_model, student, generator, args.pair_sample, nz=nz, num_classes=num_classes,
            img_size=(3, img_size, img_size), start_layer=args.start_layer, end_layer=args.end_layer,
            iterations=args.g_steps, lr_g=args.lr_g, progressive_scale=False,
            synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
            adv=args.adv, bn=args.bn, oh=args.oh, triplet=args.triplet, save_dir=args.save_dir,
            transform=transform, normalizer=args.normalizer, device=torch.device("cpu"),
            triplet_target=args.triplet_target, balanced_sampling=args.balanced_sampling)
        fake = torch.rand((1, 3, img_size, img_size))
        _, _, t_layers = t_model(fake, return_features=True)
        _, _, s_layers = student(fake, return_features=True)
        pairs = zip(t_layers, s_layers, strict=False)  # theirs is a plain zip (l.265)
        gram_layers = nn.ModuleList([nn.Conv2d(s.size(1), t.size(1), 1) for t, s in pairs])
        compute_gram_loss = main.GRAMLoss(linears=gram_layers)
        compute_cd_loss = main.CDLoss(linears=gram_layers)
        optimizer = torch.optim.SGD([
            {"params": student.parameters(), "lr": args.lr},
            {"params": compute_gram_loss.parameters(), "lr": args.lr},
        ], weight_decay=args.weight_decay, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

        with _degenerate_guard(sys.modules["losses"], guard) as sampled:
            try:
                for r in range(rounds):
                    args.current_epoch = r
                    with rec.phase("synth"):
                        synthesizer.synthesize()
                    with rec.phase("student"):
                        main.train(synthesizer, [student, t_model], criterion, optimizer, args, r,
                                   compute_cd_loss, compute_gram_loss, img_size)
                    scheduler.step()
            except RuntimeError as err:
                if "multinomial" in str(err) or "numel() == 0" in str(err):
                    raise RuntimeError(
                        "RGAL's triplet sampler (losses.py l.40-65) met a batch with one teacher label (no "
                        "negative) or no positive pair, which it cannot survive; a random teacher does that: use "
                        "export_teacher(..., calibrate=True) and run(..., guard=True)") from err
                raise
        n_cuda = len(cuda_calls)
        sampler_counts = dict(sampled)

    pairs_per_step = 2 if args.pair_sample else 1
    settings = {
        "teacher": args.teacher, "student": args.student, "synthesis_batch": args.synthesis_batch_size,
        "g_steps": args.g_steps, "kd_steps": args.kd_steps, "batch_size": args.batch_size,
        "student_images_per_step": pairs_per_step * args.batch_size, "rounds": rounds, "rounds_per_epoch": 1,
        "epochs": args.epochs, "lr": args.lr, "lr_g": args.lr_g, "T": args.T, "adv": args.adv, "bn": args.bn,
        "oh": args.oh, "triplet": args.triplet, "striplet": args.striplet, "cd_loss": args.cd_loss,
        "gram_loss": args.gram_loss, "triplet_target": args.triplet_target,
        "striplet_feature": args.striplet_feature, "start_layer": args.start_layer, "end_layer": args.end_layer,
        "pair_sample": args.pair_sample, "balanced_sampling": args.balanced_sampling, "seed": args.seed,
        "synthesis_num_workers": _SYNTH_WORKERS, "device": "cpu", "dtype": "float32",
        "save_dir": str(workdir / args.save_dir), "teacher_weights": str(teacher),
    }
    n_stages = len(t_layers)
    notes += [
        "imported main.py as a module (main() is guarded); repeated main_worker()'s set-up with their classes; "
        "timed calls are their synthesize() and train() unchanged",
        "CPU: args.gpu = None (their CPU branch), synthesizer device=cpu; main_worker's .cuda() calls on the probe "
        f"tensor and the 1x1 convs written without it; Tensor/Module.cuda identity as a net: {n_cuda} calls hit it",
        "CIFAR-10 not loaded: get_dataset ran with a dataset stand-in that keeps only the train transform",
        "README's '--balance 0.1' dropped (not a main.py argument: argparse exits)",
        "per-epoch test-set evaluation and checkpoint save left out (not timed)",
        f"triplet stages: features[{args.start_layer}:{args.end_layer}] of {n_stages} "
        f"({'the last stage' if n_stages - args.start_layer == 1 else 'the last two stages (ResNet)'})",
        "teacher weights from `teacher` (random unless trained): step cost does not depend on them, except "
        "that the spread of the teacher's labels sets how many triplets a batch forms",
    ]
    if sampler_counts["degenerate"]:
        notes.append(f"{sampler_counts['degenerate']} of {sampler_counts['calls']} triplet-sampler batches were "
                     "degenerate (one teacher label, or no two alike): "
                     + ("their 'no negatives' exit taken (triplet term 0, its cost not timed on those steps)"
                        if guard else "unguarded"))
    if stubbed:
        notes.append("stubbed in sys.modules (missing here): " + "; ".join(stubbed))
    if not pub["pair_published"]:
        notes.append("pair not published: README flags with --teacher/--student changed (README line 79)")
    if batch is not None or synthesis_batch is not None:
        notes.append(f"batch sizes overridden (batch={batch}, synthesis_batch={synthesis_batch}): not the "
                     "published run")
    if g_steps != pub["g_steps"] or kd_steps != pub["kd_steps"]:
        notes.append(f"g_steps {g_steps} / kd_steps {kd_steps} instead of {pub['g_steps']} / {pub['kd_steps']}: "
                     "extrapolate")
    return {"repo": REPO, "method": METHODS[method], "pair": pair, "settings": settings, "published": pub,
            "notes": notes, "cuda_calls_intercepted": n_cuda, "triplet_sampler": sampler_counts}

