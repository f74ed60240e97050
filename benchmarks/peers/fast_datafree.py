"""Peer adapter for zju-vipa/Fast-Datafree (Fang et al., AAAI 2022): DeepInversion, CMI, DAFL and Fast as released.

The authors' code is not copied here. It is imported where it lies (``<peers root>/Fast-Datafree``) and called
as their ``datafree_kd.py`` calls it: the same registry models, the same synthesizer classes with the same
arguments, the same student optimiser, and their own ``train()`` for the student steps. What changes, and why:

* **CPU**: synthesizers get ``device=torch.device('cpu')``; ``args.gpu`` is None, so ``train()`` skips its
  ``images.cuda(args.gpu)``; their ``prepare_model`` is not called (on a machine without CUDA it returns the
  model unchanged, line 213). Fast's meta synthesizer calls ``.cuda()`` unconditionally
  (``Generator.clone()`` and ``fomaml_grad``), so ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` are
  identity functions for the duration of :func:`run`, and restored afterwards.
* **Random weights**: the teacher is loaded from the checkpoint :func:`export_teacher` wrote (their layout,
  ``{'state_dict': ...}``), not from ``checkpoints/pretrained``. Speed does not depend on the weights.
* **No CIFAR-10 on disk**: ``registry.get_dataset`` is run with a stand-in for torchvision's ``CIFAR10`` class
  that only keeps the training transform their code builds (the synthesizers feed the image pool through it);
  the validation loader and evaluator are not built (evaluation is not timed).
* **Missing packages**: ``termcolor`` (their logger) and ``torchvision.models.utils`` (gone from torchvision;
  imported at module level by model files that are never used here) are stubbed in ``sys.modules`` when absent.
* **Steady state** (``steady=True``, default): Fast starts past its 20 warm-up epochs (the synthesizer's round
  counter is advanced, so the adversarial term and the student forward it needs are on, as in 200 of 220
  epochs); CMI's memory bank starts holding ``n_neg`` (4096) feature rows through its own ``MemoryBank.add``,
  as it does from round 17 of 200 on; the image pool of the pool-based methods starts with half the run's
  batches (uniform noise written by their ``ImagePool.add``), as mid-run. Without this the few timed rounds
  would not be the run's typical round: cheaper synthesis (no adversarial term, few negatives) and dearer
  student steps (with r batches in the pool, their non-persistent 4-worker loader restarts every r steps).
  ``steady=False`` runs from round one as released.

Each module-level name that :func:`run` and the benchmark use: :data:`REPO`, :data:`METHODS`,
:func:`published`, :func:`export_teacher`, :func:`run`. Run one adapter per process: this repository's module
names (``datafree``, ``registry``, ``datafree_kd``) are also used by other peers (CSD, CPNet, NAYER); importing
purges such modules from other folders first.
"""

from __future__ import annotations

import importlib
import random
import shutil
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

REPO = "Fast-Datafree"

# dfkd method -> the authors' --method. dfkd's ``fast`` is the meta-generator (first-order MAML), which is the
# authors' ``fast_meta`` (scripts/fast_cifar.sh, the paper's Fast-2/5/10 rows); their ``--method fast`` is the
# ablation without meta learning (README: "To disable meta learning, use --method fast").
METHODS: dict[str, str] = {"deepinversion": "deepinv", "fast": "fast_meta", "geninv": "cmi", "dafl": "dafl"}

# pair -> (their registry teacher, student)
PAIRS: dict[str, tuple[str, str]] = {"r34_r18": ("resnet34", "resnet18"), "w402_w162": ("wrn40_2", "wrn16_2")}

# Flags as the scripts pass them (file, first and last line). deepinv/cmi/dafl scripts are written for
# WRN-40-2 -> WRN-16-1 and the README table runs the other pairs with the same flags (only --teacher/--student
# differ); fast_cifar.sh has a line per pair and says "modify --dataset (and nothing else) to apply to CIFAR10".
_SCRIPTS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "deepinv": ("scripts/deepinv_cifar.sh", 1, 22, dict(
        batch_size=256, lr=0.1, epochs=200, kd_steps=400, ep_steps=400, g_steps=1000, lr_g=0.1, adv=1.0,
        bn=10.0, oh=1.0, T=20.0, act=0.0, balance=0.0, seed=0, save_dir="run/deepinv")),
    "cmi": ("scripts/cmi_cifar.sh", 1, 23, dict(
        batch_size=256, lr=0.1, kd_steps=400, ep_steps=400, g_steps=200, lr_g=1e-3, adv=0.5, bn=1.0, oh=1.0,
        cr=0.8, cr_T=0.2, act=0.0, balance=0.0, seed=0, T=20.0, save_dir="run/cmi")),
    "dafl": ("scripts/dafl_cifar.sh", 1, 20, dict(
        batch_size=256, lr=0.1, epochs=200, kd_steps=5, ep_steps=400, g_steps=1, lr_g=1e-3, adv=0.0, T=20.0,
        bn=0.0, oh=1.0, act=0.001, balance=20.0, seed=0)),
}
_FAST = dict(batch_size=256, lr=0.2, kd_steps=400, ep_steps=400, bn=10.0, act=0.0, balance=0.0, T=20.0, seed=0,
             bn_mmt=0.9, warmup=20, epochs=220, g_steps=10, lr_z=0.01, lr_g=2e-3, is_maml=1, reset_l0=1, reset_bn=0)
_FAST_LINES: dict[str, tuple[int, dict[str, Any]]] = {  # the g_steps 10 (Fast-10) line of each pair
    "r34_r18": (8, dict(adv=1.33, oh=0.5, teacher="resnet34", student="resnet18", save_dir="run/r34-10")),
    "w402_w162": (40, dict(adv=1.1, oh=0.4, student="wrn16_2", save_dir="run/wrnS162-10")),
}
# datafree_kd.py's argparse defaults for flags a script leaves out (line numbers in that file)
_DEFAULTS: dict[str, Any] = dict(epochs=200, warmup=0, lr_z=1e-3, bn_mmt=0.0, is_maml=1, reset_l0=0, reset_bn=0,
                                 cr=1.0, cr_T=0.5, act=0.0, balance=0.0, T=1.0, weight_decay=1e-4)
_DEFAULT_LINES = ("datafree_kd.py:35-49,61-70,117 (argparse defaults); :253-254 synthesis_batch_size = batch_size; "
                  ":322-324 student SGD momentum 0.9, cosine schedule per epoch")
# README.md's CIFAR-10 table names the rows by synthesis steps: DeepInv-2k, CMI-500, Fast-10; DAFL has no count
_README_ROW = {"deepinv": ("DeepInv-2k", 2000), "cmi": ("CMI-500", 500), "fast_meta": ("Fast-10", 10),
               "dafl": ("DAFL", None)}


def _authors(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"{REPO} adapter: no method {method!r}; it has {sorted(METHODS)}")
    return METHODS[method]


def _pair(pair: str) -> tuple[str, str]:
    if pair not in PAIRS:
        raise ValueError(f"{REPO} adapter: no pair {pair!r}; it has {sorted(PAIRS)}")
    return PAIRS[pair]


def _flags(name: str, pair: str) -> tuple[str, dict[str, Any]]:
    """The script flags for (authors' method, pair) and where they are written."""
    teacher, student = _pair(pair)
    if name == "fast_meta":
        line, extra = _FAST_LINES[pair]
        return f"scripts/fast_cifar.sh:{line} (with --dataset cifar10, per its line 2)", {**_FAST, **extra}
    path, first, last, flags = _SCRIPTS[name]
    return f"{path}:{first}-{last} (written for wrn40_2 -> wrn16_1)", {**flags, "teacher": teacher, "student": student}


def published(method: str, pair: str) -> dict[str, Any]:
    """The authors' published CIFAR-10 settings for (method, pair), read off their scripts.

    ``source`` names the script lines; flags a script leaves out take ``datafree_kd.py``'s defaults
    (``defaults_source``). ``kd_steps`` is student steps per ``train()`` call, ``rounds_per_epoch`` is
    ``ep_steps // kd_steps`` (datafree_kd.py:370), one synthesis and one training call each. Synthesis runs in
    warm-up epochs too but the student does not train (line 373): ``synthesis_rounds`` and ``training_rounds``
    count the whole run. ``readme_row``/``readme_g_steps`` is what README.md's table calls the run; where it
    differs from the script's ``g_steps`` (DeepInv-2k vs 1000, CMI-500 vs 200) the script is what is used.
    """
    name = _authors(method)
    teacher, student = _pair(pair)
    source, flags = _flags(name, pair)
    s = {**_DEFAULTS, **flags}
    rounds_per_epoch = s["ep_steps"] // s["kd_steps"]
    row, row_steps = _README_ROW[name]
    out: dict[str, Any] = {
        "repo": REPO, "method": method, "authors_method": name, "pair": pair, "dataset": "cifar10",
        "num_classes": 10, "teacher": teacher, "student": student, "source": source,
        "defaults_source": _DEFAULT_LINES,
        "synthesis_batch": s["batch_size"], "g_steps": s["g_steps"], "kd_steps": s["kd_steps"],
        "batch_size": s["batch_size"], "rounds_per_epoch": rounds_per_epoch, "epochs": s["epochs"],
        "warmup": s["warmup"], "lr_g": s["lr_g"], "ep_steps": s["ep_steps"],
        "synthesis_rounds": s["epochs"] * rounds_per_epoch,
        "training_rounds": (s["epochs"] - s["warmup"]) * rounds_per_epoch,
        "online": name == "dafl",  # train() samples the generator at every student step
        "lr": s["lr"], "momentum": 0.9, "weight_decay": s["weight_decay"], "T": s["T"],
        "adv": s["adv"], "bn": s["bn"], "oh": s["oh"], "act": s["act"], "balance": s["balance"], "seed": s["seed"],
        "fp16": False, "readme_row": row, "readme_g_steps": row_steps,
    }
    if name == "deepinv":
        out.update(tv=0.0, l2=0.0, save_dir=s["save_dir"])  # datafree_kd.py:258-262 passes tv=0.0, l2=0.0
    if name == "dafl":
        out.update(nz=512, ngf=64, student_T=1.0)  # line 265; line 268 replaces KLDiv(T=args.T) with KLDiv()
    if name == "cmi":
        out.update(nz=256, ngf=64, cr=s["cr"], cr_T=s["cr_T"], bank_size=40960, n_neg=4096, head_dim=256,
                   feature_reuse=False, save_dir=s["save_dir"])  # datafree_kd.py:276-290
    if name == "fast_meta":
        out.update(nz=256, ngf=64, lr_z=s["lr_z"], bn_mmt=s["bn_mmt"], is_maml=s["is_maml"],
                   reset_l0=s["reset_l0"], reset_bn=s["reset_bn"], meta_lr=s["lr_g"] * s["g_steps"],
                   save_dir=s["save_dir"])  # datafree_kd.py:305-316, fast_meta.py:87-90 (meta Adam lr_g*iterations)
    return out


def script_flags(repo: Path, method: str, pair: str) -> dict[str, str]:
    """The ``--flag value`` pairs on the script lines :func:`published` cites, as the extracted repository has them
    (so :func:`run` can check the table above against the files it runs)."""
    name = _authors(method)
    if name == "fast_meta":
        first = last = _FAST_LINES[pair][0]
        path = "scripts/fast_cifar.sh"
    else:
        path, first, last, _ = _SCRIPTS[name]
    lines = (repo / path).read_text().splitlines()[first - 1:last]
    tokens = " ".join(line.rstrip("\\").strip() for line in lines).split()
    out: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            out[tok[2:]] = "" if nxt.startswith("--") else nxt
    return out


def _check_scripts(repo: Path, method: str, pair: str, pub: dict[str, Any]) -> None:
    """Fail if the repository's script disagrees with :func:`published` (another commit, a mistyped table)."""
    skip = {"dataset", "gpu", "log_tag", "save_dir", "method", "teacher", "student"}
    for key, text in script_flags(repo, method, pair).items():
        if key in skip or key not in pub:
            continue
        want = pub[key]
        ok = float(text) == float(want) if isinstance(want, (int, float)) else text == str(want)
        if not ok:
            raise ValueError(f"{REPO}: {pub['source']} has --{key} {text}, the adapter's table {want}")


# -- importing their code -----------------------------------------------------------------------------------
_THEIRS = ("registry", "datafree", "datafree_kd")


def _stub_missing() -> list[str]:
    """Stub what their imports need but this environment lacks; returns what was stubbed (for the notes)."""
    import torch

    stubbed: list[str] = []
    try:
        import termcolor  # noqa: F401
    except ImportError:
        mod = types.ModuleType("termcolor")
        mod.colored = lambda text, *a, **k: text  # type: ignore[attr-defined]
        sys.modules["termcolor"] = mod
        stubbed.append("termcolor (colored() returns its text; only their logger uses it)")
    try:
        import torchvision.models.utils  # noqa: F401
    except ImportError:
        mod = types.ModuleType("torchvision.models.utils")
        mod.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = mod
        stubbed.append("torchvision.models.utils (removed from torchvision; load_state_dict_from_url = torch.hub's, "
                       "never called: no pretrained downloads)")
    return stubbed


def _load(repo: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType, list[str]]:
    """Import their ``datafree_kd`` (its ``main()`` is guarded), ``registry`` and ``datafree`` from ``repo``."""
    import dfkd_common.tvguard  # noqa: F401  (before torchvision: the CPU torch and CUDA torchvision wheels)

    repo = repo.resolve()
    for name in list(sys.modules):
        if name.split(".")[0] in _THEIRS:
            file = getattr(sys.modules[name], "__file__", None)
            if not file or not Path(file).resolve().is_relative_to(repo):
                del sys.modules[name]  # another peer's module of the same name
    stubbed = _stub_missing()
    while str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    kd = importlib.import_module("datafree_kd")
    return kd, sys.modules["registry"], sys.modules["datafree"], stubbed


class _NoData:
    """Stands in for torchvision's ``CIFAR10`` inside ``registry.get_dataset``: keeps the transform their code
    builds (the image pool is read through it) and loads nothing; data-free training never touches CIFAR-10
    except to evaluate, which is not timed."""

    def __init__(self, root: str, train: bool = True, download: bool = False, transform: Any = None) -> None:
        self.transform = transform


def _dataset(registry: types.ModuleType) -> tuple[int, Any]:
    saved = registry.datasets
    registry.datasets = types.SimpleNamespace(CIFAR10=_NoData)
    try:
        num_classes, train_dst, _ = registry.get_dataset(name="cifar10", data_root="./data")
    finally:
        registry.datasets = saved
    return num_classes, train_dst


def export_teacher(repo: Path, pair: str, out: Path, seed: int = 0) -> None:
    """Build their teacher for ``pair`` through their registry (``torch.manual_seed(seed)`` init) and save
    ``{'state_dict': ...}``, the layout datafree_kd.py:246 loads: random weights time the same as trained ones."""
    import torch

    _, registry, _, _ = _load(repo)
    teacher, _ = _pair(pair)
    torch.manual_seed(seed)
    model = registry.get_model(teacher, num_classes=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)


def run(repo: Path, method: str, pair: str, rec: Recorder, teacher: Path, g_steps: int, kd_steps: int,
        rounds: int, workdir: Path, batch: int | None = None, *, steady: bool = True) -> dict[str, Any]:
    """Build everything as datafree_kd.py's ``main_worker`` does for ``method`` at the published settings, then
    time ``rounds`` rounds of their loop (synthesize, then ``train()`` for ``kd_steps`` student steps).

    Differences from the published run, all recorded in the returned ``notes``: CPU, ``iterations=g_steps``,
    ``kd_steps``, the teacher from ``teacher``, ``batch`` (smoke tests) for both batch sizes, ``steady`` (module
    docstring). cwd is ``workdir``: their image pool (``save_dir``) is written there, emptied first so the pool
    holds only this run's images. DAFL's generator steps and student steps interleave (``train()`` samples the
    generator at every step: that is part of its student steps)."""
    import torch

    name = _authors(method)
    pub = published(method, pair)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    kd, registry, datafree, stubbed = _load(repo)
    _check_scripts(repo.resolve(), method, pair, pub)
    bs = pub["batch_size"] if batch is None else batch
    sbs = pub["synthesis_batch"] if batch is None else batch
    save_dir = pub.get("save_dir", f"run/{name}")
    args = Namespace(
        method=name, teacher=pub["teacher"], student=pub["student"], dataset="cifar10", gpu=None, fp16=False,
        batch_size=bs, synthesis_batch_size=sbs, g_steps=g_steps, kd_steps=kd_steps, ep_steps=pub["ep_steps"],
        lr=pub["lr"], lr_g=pub["lr_g"], lr_z=pub.get("lr_z", _DEFAULTS["lr_z"]), weight_decay=pub["weight_decay"],
        adv=pub["adv"], bn=pub["bn"], oh=pub["oh"], act=pub["act"], balance=pub["balance"], T=pub["T"],
        cr=pub.get("cr", _DEFAULTS["cr"]), cr_T=pub.get("cr_T", _DEFAULTS["cr_T"]), cmi_init=None,
        warmup=pub["warmup"], bn_mmt=pub.get("bn_mmt", 0.0), is_maml=pub.get("is_maml", 1),
        reset_l0=pub.get("reset_l0", 0), reset_bn=pub.get("reset_bn", 0), save_dir=save_dir, print_freq=0,
        current_epoch=pub["warmup"] if steady else 0, seed=pub["seed"],
    )
    args.autocast = datafree.utils.dummy_ctx  # datafree_kd.py:185, fp16 off as in every script
    cpu = torch.device("cpu")
    notes: list[str] = [f"stubbed: {s}" for s in stubbed]
    notes.append(".cuda() is the identity during the run (Fast's Generator.clone() and fomaml_grad call it "
                 "unconditionally); args.gpu = None so train() does not move images; device=cpu for synthesizers")
    notes.append(f"settings from {pub['source']}; defaults from {_DEFAULT_LINES}")
    if (g_steps, kd_steps) != (pub["g_steps"], pub["kd_steps"]):
        notes.append(f"g_steps {g_steps} (published {pub['g_steps']}), kd_steps {kd_steps} "
                     f"(published {pub['kd_steps']}): extrapolate")
    if batch is not None:
        notes.append(f"batch {batch} for both synthesis and student batches (published {pub['batch_size']}): "
                     "a smoke test, not a timing")
    with shim.in_dir(workdir), shim.cuda_is_identity():
        shutil.rmtree(workdir / save_dir, ignore_errors=True)
        random.seed(args.seed)  # datafree_kd.py:132-134 (--seed 0 in every script)
        torch.manual_seed(args.seed)
        num_classes, ori_dataset = _dataset(registry)
        # datafree_kd.py:243-249 (prepare_model is the identity without CUDA, line 213-215)
        student = registry.get_model(args.student, num_classes=num_classes)
        t_model = registry.get_model(args.teacher, num_classes=num_classes, pretrained=True).eval()
        args.normalizer = datafree.utils.Normalizer(**registry.NORMALIZE_DICT[args.dataset])
        t_model.load_state_dict(torch.load(teacher, map_location="cpu")["state_dict"])
        criterion = datafree.criterions.KLDiv(T=args.T)
        synth_mod = datafree.synthesis
        if name == "deepinv":  # datafree_kd.py:256-263
            synthesizer = synth_mod.DeepInvSyntheiszer(
                teacher=t_model, student=student, num_classes=num_classes,
                img_size=(3, 32, 32), iterations=args.g_steps, lr_g=args.lr_g,
                synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
                adv=args.adv, bn=args.bn, oh=args.oh, tv=0.0, l2=0.0,
                save_dir=args.save_dir, transform=ori_dataset.transform,
                normalizer=args.normalizer, device=cpu)
        elif name == "dafl":  # datafree_kd.py:264-274
            nz = 512
            generator = datafree.models.generator.Generator(nz=nz, ngf=64, img_size=32, nc=3)
            criterion = datafree.criterions.KLDiv()
            synthesizer = synth_mod.GenerativeSynthesizer(
                teacher=t_model, student=t_model, generator=generator, nz=nz,
                img_size=(3, 32, 32), iterations=args.g_steps, lr_g=args.lr_g,
                synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
                adv=args.adv, bn=args.bn, oh=args.oh, act=args.act, balance=args.balance, criterion=criterion,
                normalizer=args.normalizer, device=cpu)
        elif name == "cmi":  # datafree_kd.py:275-290
            nz = 256
            generator = datafree.models.generator.Generator(nz=nz, ngf=64, img_size=32, nc=3)
            feature_layers = None
            if args.teacher == "resnet34":
                feature_layers = [t_model.layer1, t_model.layer2, t_model.layer3, t_model.layer4]
            synthesizer = synth_mod.CMISynthesizer(
                t_model, student, generator,
                nz=nz, num_classes=num_classes, img_size=(3, 32, 32), feature_reuse=False,
                feature_layers=feature_layers, bank_size=40960, n_neg=4096, head_dim=256, init_dataset=args.cmi_init,
                iterations=args.g_steps, lr_g=args.lr_g, progressive_scale=False,
                synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
                adv=args.adv, bn=args.bn, oh=args.oh, cr=args.cr, cr_T=args.cr_T,
                save_dir=args.save_dir, transform=ori_dataset.transform,
                normalizer=args.normalizer, device=cpu)
            if steady:
                bank = synthesizer.mem_bank
                bank.add(torch.randn(synthesizer.n_neg, bank.dim_feat))
                notes.append(f"steady: CMI's memory bank holds {synthesizer.n_neg} random feature rows before round "
                             "one (MemoryBank.add), so each step contrasts against n_neg negatives as published "
                             "rounds 17-200 do; released, the bank fills by one synthesis batch per round")
        else:  # fast_meta, datafree_kd.py:304-316
            nz = 256
            generator = datafree.models.generator.Generator(nz=nz, ngf=64, img_size=32, nc=3)
            synthesizer = synth_mod.FastMetaSynthesizer(
                t_model, student, generator,
                nz=nz, num_classes=num_classes, img_size=(3, 32, 32), init_dataset=args.cmi_init,
                save_dir=args.save_dir, device=cpu,
                transform=ori_dataset.transform, normalizer=args.normalizer,
                synthesis_batch_size=args.synthesis_batch_size, sample_batch_size=args.batch_size,
                iterations=args.g_steps, warmup=args.warmup, lr_g=args.lr_g, lr_z=args.lr_z,
                adv=args.adv, bn=args.bn, oh=args.oh,
                reset_l0=args.reset_l0, reset_bn=args.reset_bn,
                bn_mmt=args.bn_mmt, is_maml=args.is_maml)
            if steady:
                synthesizer.ep = args.warmup
                notes.append(f"steady: the synthesizer's round counter starts at warmup={args.warmup}, so the "
                             "adversarial term (and its student forward) is on from round one, as after the "
                             "published warm-up; released, rounds 1-19 skip it and the student does not train")
            else:
                notes.append("steady=False: Fast's first warmup rounds skip the adversarial term, yet the student "
                             "trains every round here (the published loop does not train during warm-up)")
            if g_steps != pub["g_steps"]:
                notes.append(f"Fast's meta optimiser lr is lr_g * iterations = {args.lr_g * g_steps:g} here "
                             f"({pub['meta_lr']:g} published): numerics only, the work is the same")
        if steady and name != "dafl":
            filled = pub["synthesis_rounds"] // 2
            for _ in range(filled):
                synthesizer.data_pool.add(torch.rand(args.synthesis_batch_size, 3, 32, 32))
            notes.append(f"steady: the image pool starts with {filled} batches of {args.synthesis_batch_size} "
                         "uniform-noise PNGs (ImagePool.add, their writer), its size mid-run; released it holds r "
                         "batches in round r, and the loader (4 workers, not persistent) restarts every r student "
                         "steps, which would dominate a few early rounds")
        optimizer = torch.optim.SGD(student.parameters(), args.lr, weight_decay=args.weight_decay,
                                    momentum=0.9)  # datafree_kd.py:322-323; the per-epoch cosine schedule is unused
        models = [student, t_model]
        for _ in range(rounds):
            # DAFL too: its train() draws a fresh G(z) at every student step (synthesizer.sample()), which is then
            # part of the student step, as it is of the authors' epoch
            with rec.phase("synth"):
                synthesizer.synthesize()
            with rec.phase("student"):
                kd.train(synthesizer, models, criterion, optimizer, args)
    if name != "dafl":
        notes.append("the image pool is read through a DataLoader with num_workers=4, pin_memory=True, rebuilt at "
                     "the end of every synthesize() (their code): worker start-up is inside the synth phase")
    return {
        "repo": REPO, "method": method, "authors_method": name, "pair": pair, "published": pub,
        "used": {"synthesis_batch": sbs, "batch_size": bs, "g_steps": g_steps, "kd_steps": kd_steps,
                 "rounds": rounds, "steady": steady, "save_dir": str(workdir / save_dir), "device": "cpu",
                 "threads": torch.get_num_threads()},
        "stubbed": stubbed, "notes": notes,
    }
