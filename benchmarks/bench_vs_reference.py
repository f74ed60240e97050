"""dfkd against the authors' released code at the published CIFAR-10 settings, side by side on this machine.

    python benchmarks/bench_vs_reference.py --peers DIR [--methods fast nayer ...] [--g-steps 3] [--kd-steps 3]
        [--rounds 2] [--amp false] [--json OUT]
    python benchmarks/bench_vs_reference.py --peers DIR --amp true --peer-from OUT   # dfkd in bf16 vs that run
    python benchmarks/bench_vs_reference.py --peers DIR --profile FOLDER             # where dfkd's time goes

``DIR`` holds the authors' repositories as ``benchmarks/peers/README.md`` says (fetched and extracted, run where
they lie; none of their code is in this project). For each method, on its published teacher -> student pair:

1. the authors' code builds its own teacher (seeded random weights) and saves it in its checkpoint layout; dfkd
   imports that file with ``dfkd teacher import --keys`` (the same network, the same weights, on both sides);
2. **peer**: the adapter (``benchmarks/peers/<repo>.py``) builds teacher, student, synthesizer and optimisers as
   the authors' main script does at their published settings, on the CPU, and runs ``--rounds`` rounds of
   ``--g-steps`` generator steps and ``--kd-steps`` student steps through their own ``synthesize()`` and
   ``train()``;
3. **ours**: ``dfkd distill --online METHOD`` as a user runs it, in process, the study's params for the method
   with the same sizes (synthesis batch, student batch, nz), ``--g-steps``/``--kd-steps``, one round per epoch,
   ``--rounds`` epochs, no warm-up (the post-warm-up regime: student present, adversarial terms on).

Both run in fresh subprocesses with torch's default threads, one after the other, alternating which goes first.
Both are timed the same way (``benchmarks/peers/timing.py``): medians of generator-step and student-step
intervals from a global optimiser hook, and the wall of each round. The first round is a warm-up and dropped.
**Extrapolated, and labelled so**, to the published schedule: a round = measured round + (published g_steps -
run g_steps) x generator step; an epoch = rounds per epoch x round + the training call's overhead + published
kd_steps x student step (evaluation and checkpoints excluded on both sides); per 1,000 images = round /
synthesis batch x 1,000. For the interleaved methods (DAFL, DFAD) an epoch = published iterations x the
measured time per iteration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, machine

HERE = Path(__file__).resolve().parent

#: dfkd method -> (adapter module under benchmarks/peers, its published pair)
METHODS: dict[str, tuple[str, str]] = {
    "deepinversion": ("fast_datafree", "r34_r18"),
    "dafl": ("fast_datafree", "r34_r18"),
    "dfad": ("dfad", "r34_r18"),
    "fast": ("fast_datafree", "r34_r18"),
    "geninv": ("fast_datafree", "r34_r18"),
    "nayer": ("nayer", "w402_w162"),
    "cpnet": ("cpnet", "w402_w162"),
    "rgal": ("rgal", "w402_w162"),
    "dda": ("csd", "w402_w162"),
}
#: pair -> (teacher, student) in dfkd's zoo
PAIRS = {"r34_r18": ("resnet34", "resnet18"), "w402_w162": ("wrn_40_2", "wrn_16_2"),
         "w402_w161": ("wrn_40_2", "wrn_16_1")}
#: where the methods' own params live: the CIFAR studies, searched in this order (the default pipeline's last:
#: DeepInversion's and DAFL's terms, their sizes then set from the authors' published ones)
STUDIES = ["pipelines/cifar10-r34-r18/params.yaml", "pipelines/cifar10-wrn40_2-wrn16_1/params.yaml", "params.yaml"]
INTERLEAVED = {"dfad"}  # generator and student steps alternate inside the epoch (one "online" phase)
#: dfkd's online method behind a row's name (DDA's synthesis is CSD's)
ONLINE = {"dda": "csd"}


def adapter(method: str) -> Any:
    sys.path.insert(0, str(HERE))
    return importlib.import_module(f"peers.{METHODS[method][0]}")


# -- workers (each in a fresh subprocess) -------------------------------------------------------------------------
def worker_export(a: argparse.Namespace) -> None:
    adapter(a.method).export_teacher(Path(a.peers) / adapter(a.method).REPO, a.pair, Path(a.work) / "teacher.pth")


def worker_peer(a: argparse.Namespace) -> None:
    from peers.timing import Recorder

    mod = adapter(a.method)
    rec = Recorder().install()
    work = Path(a.work) / "peer"
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        used = mod.run(Path(a.peers).resolve() / mod.REPO, a.method, a.pair, rec, Path(a.work) / "teacher.pth",
                       a.g_steps, a.kd_steps, a.rounds, work, a.batch)
    finally:
        os.chdir(cwd)
    print(json.dumps({"summary": rec.summary(), "used": used}, default=str))


def _tiny_cifar(root: Path) -> None:
    """CIFAR-10 in torchvision's layout, 2 images a class: dfkd's loaders need the dataset the teacher names
    (its info, and the per-epoch test evaluation, which the figures exclude)."""
    import dfkd_common.tvguard  # noqa: F401  (torchvision on the CPU build of torch: before torchvision)

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import torchvision.datasets.cifar as tv_cifar
    from cifar_layout import write_cifar10

    write_cifar10(root, per_class=2, test_per_class=1)
    tv_cifar.CIFAR10._check_integrity = lambda self: True  # the fixture's md5s are not the real dataset's
    tv_cifar.check_integrity = lambda *args, **kwargs: True


def ours_params(a: argparse.Namespace, pub: dict[str, Any]) -> dict[str, Any]:
    """The study's params for the method, at the authors' published sizes and the run's step counts."""
    teacher, student = PAIRS[a.pair]
    found = [yaml.safe_load((ROOT / f).read_text())["distill"] for f in STUDIES]
    study = next((d for d in found if a.method in d), found[-1])  # the study that publishes the method
    common = dict(study["common"])
    own = dict(study.get(a.method) or {})
    online = {**common.pop("online", {}), **own.get("online", {})}
    if a.method == "deepinversion":
        # the authors' deepinv script: bn 10, oh 1, adv 1 (a student forward and backward every step), tv/l2 0
        online = {"lr": pub.get("lr_g", 0.1), "weights": {"bn": 10.0, "oh": 1.0, "adv": 1.0, "tv": 0.0, "l2": 0.0}}
    if a.method == "dafl":
        # the authors' dafl script: oh 1, balance 20, act 0.001, nz 512
        online = {"nz": pub.get("nz", 512), "ngf": 64, "lr_g": pub.get("lr_g", 1e-3),
                  "weights": {"oh": 1.0, "ie": 20.0, "act": 0.001}}
    amp = {"false": False, "true": True}.get(a.amp, a.amp)
    online["amp"] = amp
    method = {**own, "online": online}
    method.pop("<<", None)
    if a.batch:  # smoke test
        pub = {**pub, "batch_size": a.batch, "synthesis_batch": a.batch}
    sizes: dict[str, Any] = {"batch_size": pub["batch_size"], "epochs": a.rounds, "student_warmup": "train",
                             "kd_steps": a.kd_steps, "student": student, "data_root": str(Path(a.work) / "data"),
                             "amp": amp}
    if a.method == "dda":
        # a random teacher's stage-3 maps under fea 30 x MSE at lr 0.1 blow the student up within two steps and the
        # next CSD round stops on a NaN loss (dfkd checks; the authors' code carries on): a smaller step, the same work
        sizes["lr"] = 1e-4
    if a.method in INTERLEAVED:
        online.update(iterations=a.kd_steps, record=0)
        sizes["kd_steps"] = None
    else:
        online.update(batch_size=pub["synthesis_batch"], g_steps=a.g_steps, g_loops=1, warmup=0)
        online.pop("warmup_loops", None)
        online.pop("reset_l0", None)
        online.pop("g_life", None)
    for key in ("nz", "ngf"):
        if key in pub and key in online:
            online[key] = pub[key]
    return {"seed": 0,
            "teacher": {"source": "import", "weights": str(Path(a.work) / "teacher.pth"),
                        "keys": "cmi", "dataset": "cifar10", "arch": teacher,
                        "data_root": str(Path(a.work) / "data")},
            "distill": {"common": {**common, **sizes}, a.method: {**method, **sizes}}}


def worker_ours(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from peers.timing import Recorder

    import dfkd_common.loops.distillation as dist
    from stages.cli import app

    work = Path(a.work) / "ours"
    work.mkdir(parents=True, exist_ok=True)
    _tiny_cifar(Path(a.work) / "data")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(ours_params(a, adapter(a.method).published(a.method, a.pair))))
    _cli(app, ["teacher", "import", "--out", str(work / "teacher.safetensors"), "--params", str(params)])

    rec = Recorder().install()
    # phases: a round = the feed's before_epoch (synthesis + recording into the bank); the training call = from
    # there to the epoch's evaluation (batches drawn from the bank, student steps); for the interleaved methods
    # the training call is the phase "online"
    evaluate = dist.evaluate
    train_phase = "online" if a.method in INTERLEAVED else "student"

    prof = Profiles(Path(a.profile) if a.profile else None)

    def timed(orig: Any) -> Any:
        def before_epoch(epoch: int, side: Any) -> Any:
            with rec.phase("synth"), prof.phase("synth", epoch):
                out = orig(epoch, side)
            rec.begin(train_phase)
            prof.start(train_phase, epoch)
            return out
        return before_epoch

    def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
        rec.end()
        prof.stop()
        return evaluate(*args, **kwargs)

    run = dist.StudentLoop.run

    def timed_run(self: Any, epoch: int) -> Any:  # the feed's before_epoch, wrapped on the instance once
        if "before_epoch" not in vars(self.feed):
            self.feed.before_epoch = timed(self.feed.before_epoch)
        return run(self, epoch)

    dist.StudentLoop.run = timed_run  # type: ignore[method-assign]
    dist.evaluate = timed_evaluate
    _cli(app, ["distill", "--name", a.method, "--online", ONLINE.get(a.method, a.method),
               "--teacher", str(work / "teacher.safetensors"),
               "--out", str(work / "student.safetensors"), "--bank-out", str(work / "bank.h5"),
               "--metrics", str(work / "metrics.json"), "--params", str(params)])
    print(json.dumps({"summary": rec.summary(), "used": ours_params(a, adapter(a.method).published(
        a.method, a.pair))["distill"]}, default=str))


class Profiles:
    """``--profile OUT``: torch.profiler over the last round's phases (the first epoch is a warm-up), each
    phase's operators by self CPU time written to ``OUT`` (JSON) and summarised by :func:`profile_summary`."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.prof, self.name, self.tables = out, None, "", {}
        self.epoch = -1

    def start(self, name: str, epoch: int) -> None:
        if self.out is None or epoch < 1:
            return
        from torch.profiler import ProfilerActivity, profile

        self.name, self.prof = name, profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()

    def stop(self) -> None:
        if self.prof is None or self.out is None:
            return
        self.prof.__exit__(None, None, None)
        ops = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "count": e.count}
               for e in self.prof.key_averages()]
        self.tables[self.name] = sorted(ops, key=lambda o: -o["self_s"])
        self.prof = None
        self.out.write_text(json.dumps(self.tables))

    @contextmanager
    def phase(self, name: str, epoch: int) -> Iterator[None]:
        self.start(name, epoch)
        try:
            yield
        finally:
            self.stop()


def _cli(app: Any, words: list[str]) -> None:
    """``dfkd WORDS`` in this process (so the optimiser hook sees its steps); a failed stage stops the worker."""
    code = app(words, standalone_mode=False)
    if code:
        raise SystemExit(f"dfkd {words[0]} failed ({code})")


# -- the side-by-side ------------------------------------------------------------------------------------------
def spawn(role: str, a: argparse.Namespace, method: str, pair: str, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", role, "--method", method, "--pair", pair, "--work", str(work),
           "--peers", str(a.peers), "--g-steps", str(a.g_steps), "--kd-steps", str(a.kd_steps),
           "--rounds", str(a.rounds), "--amp", a.amp] + (["--batch", str(a.batch)] if a.batch else [])
    if a.profile and role == "ours":
        Path(a.profile).mkdir(parents=True, exist_ok=True)
        cmd += ["--profile", str(Path(a.profile).resolve() / f"{method}.json")]
    env = {**os.environ, "DFKD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{role} worker failed for {method}")
    if role == "export":
        return {}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def extrapolate(s: dict[str, Any], pub: dict[str, Any], a: argparse.Namespace, role: str) -> dict[str, Any]:
    """Per published round, per 1,000 images and per epoch (see the module doc).

    An epoch of the authors' main loops is ``rounds_per_epoch`` x (one ``synthesize()`` + one ``train()`` of
    ``kd_steps``); their ``synthesize()`` runs ``g_loops`` loops of ``g_steps`` where ``g_steps_per_round`` says
    so (NAYER, CPNet), each keeping one batch. dfkd's epoch does the same work as ``rounds_per_epoch x g_loops``
    rounds of one loop each, then ``rounds_per_epoch x kd_steps`` student steps."""
    gen, stu = s["generator_step_s"], s["student_step_s"]
    if a.method in INTERLEAVED:
        per_iter = s["online_call_s"] / a.kd_steps
        return {"generator_step_s": gen, "student_step_s": stu, "round_s": None,
                "per_1000_images_s": per_iter / pub["synthesis_batch"] * 1000, "epoch_s": per_iter * pub["kd_steps"]}
    calls = pub.get("rounds_per_epoch", 1)
    loops = pub.get("g_steps_per_round", pub["g_steps"]) // pub["g_steps"]
    if role == "peer":
        rounds, loops_run, train_calls = calls, loops, calls
    else:
        rounds, loops_run, train_calls = calls * loops, 1, 1
    per_round = loops_run * pub["g_steps"]
    round_s = s["round_s"] + (per_round - loops_run * a.g_steps) * gen
    overhead = max(0.0, s["train_call_s"] - a.kd_steps * stu)
    epoch = rounds * round_s + train_calls * overhead + calls * pub["kd_steps"] * stu
    images = loops_run * pub["synthesis_batch"]
    return {"generator_step_s": gen, "student_step_s": stu, "round_s": round_s, "images_per_round": images,
            "per_1000_images_s": round_s / images * 1000, "epoch_s": epoch, "train_overhead_s": overhead}


def compare(a: argparse.Namespace) -> None:
    print(f"# machine: {machine()}")
    print(f"# run: g_steps {a.g_steps}, kd_steps {a.kd_steps}, rounds {a.rounds} (first dropped), amp {a.amp}"
          + (f"; the authors' figures from {a.peer_from}" if a.peer_from else "")
          + (f", batch {a.batch} (smoke test: not the published sizes)" if a.batch else ""))
    rows = []
    for i, method in enumerate(a.methods):
        pair = a.pair or METHODS[method][1]
        pub = adapter(method).published(method, pair)
        with tempfile.TemporaryDirectory(prefix=f"vsref-{method}-") as tmp:
            work = Path(tmp)
            try:
                spawn("export", a, method, pair, work)
                order = ["peer", "ours"] if i % 2 == 0 else ["ours", "peer"]
                if a.profile:  # dfkd's side only, under the profiler: where its time goes
                    spawn("ours", a, method, pair, work)
                    print(profile_summary(method, Path(a.profile) / f"{method}.json"), flush=True)
                    continue
                if a.peer_from:  # the authors' figures of an earlier run (same machine): dfkd's side only
                    order = ["ours"]
                got = {role: spawn(role, a, method, pair, work) for role in order}
                if a.peer_from:
                    earlier = {r["method"]: r for r in json.loads(Path(a.peer_from).read_text())["rows"]}
                    got["peer"] = {"summary": earlier[method]["raw"]["peer"]}
            except SystemExit as err:  # one method's failure is reported; the others still run
                print(f"{method:14s} {pair:9s} FAILED: {err}", flush=True)
                continue
        a.method = method
        sides = {role: extrapolate(got[role]["summary"], pub, a, role) for role in got}
        row = {"method": method, "pair": pair, "published": pub, "ours": sides["ours"], "peer": sides["peer"],
               "raw": {r: got[r]["summary"] for r in got},
               "used": {r: got[r].get("used") for r in got}}  # what each side ran, the adapters' notes included
        for key in ("generator_step_s", "per_1000_images_s", "epoch_s", "student_step_s"):
            o, p = sides["ours"].get(key), sides["peer"].get(key)
            row[f"x_{key}"] = p / o if o and p else None
        rows.append(row)
        print(_line(row), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"machine": machine(), "args": vars(a), "rows": rows}, indent=1,
                                               default=str))


#: operator -> what it is, for the profile summary (first match wins; the rest is "other")
CATEGORIES = [
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batch norm", ("batch_norm", "native_batch_norm")),
    ("BN-statistics hooks", ("var_mean", "aten::var", "linalg_vector_norm", "aten::mean")),
    ("linear / matmul", ("addmm", "aten::mm", "matmul", "aten::linear", "bmm")),
    ("optimiser", ("adam", "sgd", "_foreach", "lerp", "addcdiv", "addcmul")),
    ("copies / layout", ("copy_", "clone", "contiguous", "to_dense", "permute", "reshape", "cat", "aten::to",
                         "empty_like")),
    ("augmentation / resampling", ("grid_sampler", "affine_grid", "flip", "roll", "pad", "upsample", "interpolate",
                                   "rot90", "index", "gather")),
    ("elementwise / activations", ("relu", "leaky", "mul", "add", "sub", "div", "sigmoid", "tanh", "threshold",
                                   "where", "clamp", "exp", "log", "pow", "sqrt", "neg", "fill_", "zero_")),
    ("losses / softmax", ("softmax", "nll", "cross_entropy", "kl_div", "l1_loss", "mse", "log_softmax")),
]


def profile_summary(method: str, path: Path) -> str:
    """Each profiled phase: its self CPU seconds by category and its five costliest operators."""
    tables = json.loads(path.read_text())
    lines = []
    for phase, ops in tables.items():
        total = sum(o["self_s"] for o in ops) or 1e-9
        cats: dict[str, float] = {}
        for o in ops:
            name = o["op"].lower()
            cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
            cats[cat] = cats.get(cat, 0.0) + o["self_s"]
        share = ", ".join(f"{c} {v / total:.0%}" for c, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v / total
                          >= 0.01)
        top = ", ".join(f"{o['op']} {o['self_s'] / total:.0%}" for o in ops[:5])
        lines.append(f"{method:14s} {phase:8s} {total:7.2f} s self CPU | {share} | top: {top}")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The side-by-side as docs/RESULTS.md shows it (``--table JSON`` prints it for an earlier run)."""
    out = ["| method | pair | generator step, dfkd / authors | per 1,000 images* | per epoch* | student step |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]

    def cell(r: dict[str, Any], key: str) -> str:
        o, p, x = r["ours"].get(key), r["peer"].get(key), r.get(f"x_{key}")
        return "-" if o is None or p is None else f"{o:,.1f} / {p:,.1f} s (**{x:.2f}x**)"

    for r in rows:
        out.append(f"| {r['method']} | {r['pair']} | {cell(r, 'generator_step_s')} | {cell(r, 'per_1000_images_s')} "
                   f"| {cell(r, 'epoch_s')} | {cell(r, 'student_step_s')} |")
    return "\n".join(out)


def _line(r: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "s") -> str:
        return "-" if v is None else f"{v:.2f} {unit}"

    def x(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}x"

    o, p = r["ours"], r["peer"]
    return (f"{r['method']:14s} {r['pair']:9s} gen step {f(o['generator_step_s'])} vs {f(p['generator_step_s'])}"
            f" ({x(r['x_generator_step_s'])}) | student step {f(o['student_step_s'])} vs {f(p['student_step_s'])}"
            f" ({x(r['x_student_step_s'])}) | per 1,000 images {f(o['per_1000_images_s'])} vs "
            f"{f(p['per_1000_images_s'])} ({x(r['x_per_1000_images_s'])}) | epoch (extrapolated) "
            f"{f(o['epoch_s'])} vs {f(p['epoch_s'])} ({x(r['x_epoch_s'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=None, help="folder with the authors' repositories (benchmarks/peers/README.md)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--pair", choices=list(PAIRS), default=None, help="override each method's published pair")
    ap.add_argument("--g-steps", type=int, default=3)
    ap.add_argument("--kd-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="false", help="dfkd's amp: false (fp32, as the authors' code) or auto/true")
    ap.add_argument("--batch", type=int, default=None, help="smoke test only: every batch size set to this")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--peer-from", default=None, help="take the authors' figures from this earlier --json run on "
                    "the same machine and time dfkd's side only (its bf16 run: the authors' code has no CPU bf16)")
    ap.add_argument("--profile", default=None, help="dfkd's side only: torch.profiler tables per method into this "
                    "folder, and a summary of each printed")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print an earlier --json run as a markdown table, run nothing")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(Path(a.table).read_text())["rows"]))
    elif a.worker:
        {"export": worker_export, "peer": worker_peer, "ours": worker_ours}[a.worker](a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
