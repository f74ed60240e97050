"""RGAL: triplet sampling, the relation terms' signs, the cd adapters, the rgal synthesizer on every CIFAR pair."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.loops.distillation import BankFeed, Distillation, distill
from dfkd_common.loops.runner import StateFile
from dfkd_common.models import build_model
from dfkd_common.relation import _log_weights, pooled, sample_triplets, triplet_hinge
from dfkd_common.student import STUDENT_TERMS, StudentSide, StudentStep, TermSetup
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.losses import TERMS

INFO = get_dataset("mnist5k").info
ENGINE = Engine.create("cpu", amp=False, channels_last=False)
REPO = Path(__file__).resolve().parents[2]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ sampling
def test_triplets_pair_same_labels_and_draw_negatives_only_inside_the_window() -> None:
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(40, 10), dim=1)
    labels = torch.arange(40) % 4
    a, p, n = sample_triplets(emb, labels, gen(), window=(0.5, 1.0))
    assert len(a) == 40 * 9  # every ordered same-label pair: 4 classes x 10 x 9
    assert bool((labels[a] == labels[p]).all()) and bool((a != p).all()) and bool((labels[a] != labels[n]).all())
    d = torch.cdist(emb, emb)
    has_window = ((d > 0.5) & (d < 1.0) & (labels[:, None] != labels[None, :])).any(1)
    inside = (d[a, n] > 0.5) & (d[a, n] < 1.0)
    assert bool(inside[has_window[a]].all())  # anchors with a candidate in the window only draw from it


def test_a_row_without_negatives_in_the_window_falls_back_to_uniform() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])  # other labels at distance 2
    labels = torch.tensor([0, 0, 1, 1])
    seen = set()
    for s in range(20):
        a, _, n = sample_triplets(emb, labels, gen(s), window=(0.5, 1.0))
        assert len(a) == 4 and bool((labels[n] != labels[a]).all())
        seen |= {(int(x), int(y)) for x, y in zip(a, n, strict=True)}
    assert {(0, 2), (0, 3)} <= seen  # both other-label samples get drawn


@pytest.mark.parametrize("labels", [torch.zeros(8, dtype=torch.long), torch.arange(8),
                                    torch.zeros(1, dtype=torch.long)])
def test_batches_without_positive_pairs_or_negatives_give_zero_not_nan(labels: torch.Tensor) -> None:
    feats = torch.randn(len(labels), 5, requires_grad=True)
    a, p, n = sample_triplets(torch.randn(len(labels), 10), labels, gen(), window=(0.5, 1.0))
    assert len(a) == 0
    loss = triplet_hinge([feats], a, p, n)
    assert float(loss) == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_sampling_weights_do_not_underflow_with_100_classes() -> None:
    """With n = 100 the log-weights span hundreds of nats: normalised over the window they stay usable."""
    torch.manual_seed(1)
    emb = F.normalize(torch.randn(64, 100), dim=1)
    logw = _log_weights(torch.cdist(emb, emb), 100)
    assert float(logw.max() - logw.min()) > 50  # exp of the raw row would underflow
    labels = torch.arange(64) % 32
    a, _, n = sample_triplets(emb, labels, gen(), window=(0.5, 1.5))
    assert len(a) == 64 and bool((labels[a] != labels[n]).all())


# ------------------------------------------------------------------------------------------------- signs
def _step_distance(swap: bool) -> tuple[float, float, float, float]:
    """One gradient step on the hinge over fixed triplets; (d_ap, d_an) before and after."""
    torch.manual_seed(0)
    f = torch.randn(3, 4, requires_grad=True)
    a, p, n = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    dist = lambda i, j: float((f[i] - f[j]).norm())  # noqa: E731
    before = (dist(0, 1), dist(0, 2))
    loss = triplet_hinge([f], a, p, n, margin=10.0, swap=swap)  # margin large: the hinge is active
    loss.backward()
    with torch.no_grad():
        f -= 0.05 * f.grad
    return (*before, dist(0, 1), dist(0, 2))


def test_the_ordinary_hinge_pulls_same_labels_together_and_swap_pulls_different_labels_together() -> None:
    ap0, an0, ap1, an1 = _step_distance(swap=False)  # the student's term
    assert ap1 < ap0 and an1 > an0
    ap0, an0, ap1, an1 = _step_distance(swap=True)  # synthesis, swap mode: the different-label pair comes closer
    assert an1 < an0 and ap1 > ap0


def test_the_synthesis_term_reads_the_students_stages_and_is_zero_without_a_student() -> None:
    torch.manual_seed(0)
    teacher = build_model("lenet5", 10, 1, INFO.mean, INFO.std).eval()
    student = build_model("lenet5_half", 10, 1, INFO.mean, INFO.std).eval()
    synth = build_synthesizer("rgal", teacher, INFO, {"batch_size": 40, "g_steps": 1, "ngf": 8}, ENGINE)
    x = torch.rand(40, 1, 32, 32, requires_grad=True)
    ctx = synth.context(x, None, None)
    assert ctx.stages is None and float(TERMS.get("triplet")(ctx, synth.term_options("triplet"))) == 0
    ctx = synth.context(x, None, student)
    assert ctx.stages[0].shape[1:] == (60, 1, 1)  # lenet5_half's last stage: its C5 conv
    value = TERMS.get("triplet")(ctx, synth.term_options("triplet"))
    assert torch.isfinite(value)
    if float(value):
        value.backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0  # the relation moves the images


def test_stage_maps_are_asked_for_by_the_term_that_reads_them() -> None:
    """The synthesizer learns which stage maps to hook from the terms' own ``stages_of``, not from a term's name:
    a teacher-target request hooks the teacher, and two terms asking for different maps is one error line."""
    from dfkd_common.synthesis.losses import StageRequest, term

    teacher = build_model("lenet5", 10, 1, INFO.mean, INFO.std).eval()
    synth = build_synthesizer("rgal", teacher, INFO, {"terms": {"triplet": {"target": "teacher", "stages": [0]}},
                                                      "batch_size": 8}, ENGINE)
    ctx = synth.context(torch.rand(8, 1, 32, 32), None, None)  # no student needed: the teacher's first stage
    assert ctx.stages is not None and ctx.stages[0].shape[1] == 6  # LeNet-5: 6 channels, its half 3
    with pytest.raises(DfkdError, match=r"terms.triplet.target must be one of student, teacher, got .both."):
        build_synthesizer("rgal", teacher, INFO, {"terms": {"triplet": {"target": "both"}}}, ENGINE)

    @term("test_other_stages", needs=("stages",), stages_of=lambda opts: StageRequest("student", (0,)))
    def other(ctx: Any, opts: Any) -> torch.Tensor:
        return ctx.t_logits.new_zeros(())

    with pytest.raises(DfkdError, match="ask for different stage maps"):
        build_synthesizer("rgal", teacher, INFO, {"weights": {"test_other_stages": 1.0}}, ENGINE)


def test_triplet_options_are_checked() -> None:
    teacher = build_model("lenet5", 10, 1, INFO.mean, INFO.std).eval()
    synth = build_synthesizer("rgal", teacher, INFO, {"terms": {"triplet": {"stages": [7]}}}, ENGINE)
    with pytest.raises(DfkdError, match="out of range"):
        synth.context(torch.rand(4, 1, 32, 32), None, build_model("lenet5_half", 10, 1, INFO.mean, INFO.std))
    with pytest.raises(DfkdError, match="unknown"):
        build_synthesizer("rgal", teacher, INFO, {"terms": {"triplet": {"windw": [0, 1]}}}, ENGINE)


# ----------------------------------------------------------------------------------------- student terms
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_striplet_uses_two_views_and_pulls_same_label_views_together(seed: int) -> None:
    """One gradient step on the term brings same-label features closer relative to different-label ones (mean
    distance of same-label pairs minus that of different-label pairs falls: 200 of 200 seeds when measured)."""
    torch.manual_seed(seed)  # the features and the negatives' draws (the global stream): not left to test order
    term = STUDENT_TERMS.get("striplet")({}, None)  # type: ignore[arg-type]
    assert term.views == 2
    feat = torch.randn(8, 6, requires_grad=True)
    logits = torch.randn(8, 3)
    labels = [0, 1, 2, 0] * 2  # views of image i: rows i and i + 4
    t_logits = F.one_hot(torch.tensor(labels), 3).float() * 5
    step = StudentStep(x=torch.zeros(8, 1, 4, 4), labels=torch.zeros(8, dtype=torch.long), s_logits=logits,
                       t_logits=t_logits, s_feat=feat, views=2)
    pairs = list(itertools.combinations(range(8), 2))

    def gap(f: torch.Tensor) -> float:
        p = pooled(f.detach())
        d = {(i, j): float((p[i] - p[j]).norm()) for i, j in pairs}
        same = [v for (i, j), v in d.items() if labels[i] == labels[j]]
        other = [v for (i, j), v in d.items() if labels[i] != labels[j]]
        return sum(same) / len(same) - sum(other) / len(other)

    before = gap(feat)
    term(step).backward()
    assert gap(feat - 0.5 * feat.grad) < before
    late = StudentStep(**{**step.__dict__, "progress": 0.5})
    assert float(STUDENT_TERMS.get("striplet")({"custom_steps": 0.5}, None)(late)) == 0  # type: ignore[arg-type]


def test_cd_adapters_train_resume_and_stay_out_of_the_student(tmp_path: Path, mnist_test, student_side: Any) -> None:
    images = mnist_test.images[:96]
    cfg = Distillation(epochs=2, batch_size=32, lr=0.05, augment=AugmentConfig(crop_pad=0))

    def run(out: str, stop_after: int | None = None) -> StudentSide:
        teacher, side = student_side({"kd": 1.0, "cd": 1.0, "striplet": 0.5})

        def stop(row: dict[str, float]) -> None:
            if stop_after is not None and row["epoch"] == stop_after:
                raise KeyboardInterrupt

        try:
            distill(teacher, side, BankFeed(images, mnist_test.labels[:96], torch.device("cpu")), mnist_test, cfg,
                    ENGINE, StateFile.for_output(tmp_path / out, {"k": 1}), on_epoch=stop)
        except KeyboardInterrupt:
            pass
        return side

    straight = run("a")
    run("b", stop_after=1)
    resumed = run("b")
    fresh = student_side({"kd": 1.0, "cd": 1.0})[1]
    adapter = straight.terms["cd"].adapters[0]
    assert adapter.in_channels == 60 and adapter.out_channels == 120  # lenet5_half -> lenet5, last stage (C5)
    assert not torch.equal(adapter.weight, fresh.terms["cd"].adapters[0].weight)  # it trained
    assert torch.equal(adapter.weight, resumed.terms["cd"].adapters[0].weight)  # and was resumed
    assert not any("adapter" in k for k in straight.student.state_dict())


# --------------------------------------------------------------------------------- any pair of the studies
CIFAR = get_dataset("cifar10").info


@pytest.mark.parametrize("pair", [("resnet34", "resnet18"), ("wrn_40_2", "wrn_16_1"), ("wrn_40_2", "wrn_16_2"),
                                  ("vgg11_bn", "resnet18")])
def test_rgal_synthesis_and_student_step_for_every_cifar_pair(pair: tuple[str, str]) -> None:
    torch.manual_seed(0)
    teacher = build_model(pair[0], 10, 3, CIFAR.mean, CIFAR.std).eval()
    student = build_model(pair[1], 10, 3, CIFAR.mean, CIFAR.std)
    side = StudentSide(student, {"kd": 1.0, "striplet": 0.1, "cd": 0.1}, {"kd": {"tau": 20.0}},
                       TermSetup(teacher, student, 3, 32, None))
    synth = build_synthesizer("rgal", teacher, CIFAR, {"batch_size": 8, "g_steps": 1, "ngf": 8}, ENGINE)
    side.eval()
    result = synth.synthesize(0, side)
    assert result.images.shape == (8, 3, 32, 32) and "triplet" in result.logs
    side.train()
    feed = BankFeed((result.images * 255).to(torch.uint8), result.labels, torch.device("cpu"))
    images, labels = next(iter(feed.batches(8, gen())))
    from dfkd_common.loops.distillation import TeacherFeatures, make_step

    hooks = TeacherFeatures(teacher, side.needs, 3, 32)
    step = make_step(images, labels, side, teacher, torch.nn.Identity(), ENGINE, hooks)
    loss, logs = side.objective(step)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"kd", "striplet", "cd"}
    assert side.terms["cd"].adapters[0].weight.grad is not None
    hooks.remove()


@pytest.mark.slow
def test_a_small_online_rgal_run_beats_chance_widely_on_real_digits(tmp_path: Path, teacher_ckpt: Path) -> None:
    out = tmp_path / "s.safetensors"
    (tmp_path / "none.yaml").write_text("{}\n")  # the defaults and the options below only
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "distill", "--online", "rgal", "--teacher", str(teacher_ckpt),
         "--out", str(out), "--metrics", str(tmp_path / "m.json"), "--params", str(tmp_path / "none.yaml"),
         "--set", "epochs=6", "--set", "kd_steps=20", "--set", "batch_size=64",
         "--set", "weights={kd: 1, striplet: 0.1, cd: 0.1}", "--set", "terms.kd.tau=20",
         "--set", "online.batch_size=64", "--set", "online.g_steps=20", "--set", "online.ngf=16",
         "--set", "online.augment={crop_pad: 2}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "DFKD_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = json.loads((tmp_path / "m.json").read_text())["test_acc"]
    assert acc > 0.5, acc  # chance: 0.1 on the 1,000 real held-out digits



def test_online_rgal_alone_runs_the_published_student_objective(tmp_path: Path) -> None:
    from dfkd_common.runs.student_run import resolve_run

    empty = tmp_path / "p.yaml"
    empty.write_text("{}\n")
    rgal = resolve_run(empty, None, online="rgal")
    assert rgal.weights == {"kd": 1.0, "striplet": 0.1, "cd": 0.1} and rgal.terms["kd"]["tau"] == 20.0
    assert resolve_run(empty, None, online="nayer").weights == {"kd": 1.0}
    own = resolve_run(empty, None, ["weights={kd: 1.0}"], online="rgal")
    assert own.weights == {"kd": 1.0}  # a run's own objective replaces the method's
    added = resolve_run(empty, None, ["weights.cd=0.5"], online="rgal")
    assert added.weights == {"kd": 1.0, "striplet": 0.1, "cd": 0.5}  # a --set into it adds to the method's
