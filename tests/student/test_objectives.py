"""Composable objectives on both sides: student terms (sign, gradient, needs, views, parameter groups, resume),
synthesis terms' needs and options, the shared round loop, and stage features for any architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.loops.distillation import BankFeed, Distillation, distill
from dfkd_common.loops.runner import StateFile
from dfkd_common.models import MODELS, build_model
from dfkd_common.models.hooks import stage_outputs
from dfkd_common.student import STUDENT_TERMS, StudentSide, StudentStep, StudentTerm, TermSetup, register
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.base import SYNTHESIZERS, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context

INFO = get_dataset("mnist5k").info
ENGINE = Engine.create("cpu", amp=False, channels_last=False)


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return (build_model("lenet5", 10, 1, INFO.mean, INFO.std).eval(),
            build_model("lenet5_half", 10, 1, INFO.mean, INFO.std))


# --------------------------------------------------------------------------------------- student terms alone
def test_ce_term_pulls_the_labelled_class_up_and_ignores_unlabelled_rows() -> None:
    ce = STUDENT_TERMS.get("ce")({}, None)  # type: ignore[arg-type]
    s = torch.zeros(4, 10, requires_grad=True)
    labels = torch.tensor([3, -1, 3, -1])
    ce(StudentStep(torch.zeros(4), labels, s)).backward()
    assert s.grad is not None
    assert float(s.grad[0, 3]) < 0 and float(s.grad[0, 0]) > 0  # descent raises the label's logit
    assert torch.count_nonzero(s.grad[1]) == 0 and torch.count_nonzero(s.grad[3]) == 0
    assert float(ce(StudentStep(torch.zeros(2), torch.tensor([-1, -1]), torch.randn(2, 10)))) == 0.0


def test_kd_term_is_zero_at_the_teacher_and_descends_toward_it() -> None:
    kd = STUDENT_TERMS.get("kd")({"tau": 4.0}, TermSetup(None, None, 1, 32))  # type: ignore[arg-type]
    t = torch.randn(8, 10)
    assert float(kd(StudentStep(torch.zeros(8), torch.zeros(8), t.clone(), t))) < 1e-6
    s = torch.randn(8, 10, requires_grad=True)
    loss = kd(StudentStep(torch.zeros(8), torch.zeros(8), s, t))
    loss.backward()
    assert s.grad is not None
    after = kd(StudentStep(torch.zeros(8), torch.zeros(8), (s - 0.5 * s.grad).detach(), t))
    assert float(after) < float(loss)


def test_l1_term_gradient_points_from_student_to_teacher() -> None:
    l1 = STUDENT_TERMS.get("l1")({}, None)  # type: ignore[arg-type]
    s = torch.zeros(2, 3, requires_grad=True)
    t = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, -2.0]])
    l1(StudentStep(torch.zeros(2), torch.zeros(2), s, t)).backward()
    assert s.grad is not None and torch.equal(torch.sign(s.grad), -torch.sign(t))


def test_unknown_terms_and_options_are_one_line_errors(student_side: Any) -> None:
    with pytest.raises(DfkdError, match=r"weights\.nope: no such student term"):
        student_side({"nope": 1.0})[1]
    with pytest.raises(DfkdError, match=r"unknown param\(s\) terms\.kd\.taux"):
        student_side({"kd": 1.0}, {"kd": {"taux": 4}})[1]
    with pytest.raises(DfkdError, match="weight 0"):
        student_side({"kd": 0.0})[1]


def test_the_side_sums_weighted_terms_and_describes_its_objective(student_side: Any) -> None:
    side = student_side({"kd": 2.0, "ce": 0.5}, {"kd": {"tau": 2.0}})[1]
    x = torch.rand(4, 1, 32, 32)
    s, t, y = side.student(x), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    total, logs = side.objective(StudentStep(x, y, s, t))
    assert float(total) == pytest.approx(2.0 * logs["kd"] + 0.5 * logs["ce"], rel=1e-6)
    assert side.describe() == "2*kd(tau=2.0) + 0.5*ce"
    assert side.needs == {"s_logits", "t_logits", "labels"} and side.views == 1


# ------------------------------------------------------------------------- modules, groups, optimisers, resume
class _Adapter(StudentTerm):
    """A test term owning a module that trains with the student at its own learning rate."""

    name = "test_adapter"
    @dataclass(frozen=True)
    class Options:
        lr: float = 0.5

    needs: ClassVar[frozenset[str]] = frozenset({"s_logits"})

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        self.scale = nn.Parameter(torch.ones(10))

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.scale], "lr": self.opts.lr}]

    def forward(self, step: StudentStep) -> torch.Tensor:
        return (step.s_logits * self.scale).square().mean()


class _Pairs(StudentTerm):
    """A test term that needs two views of every image and the stage features of both networks."""

    name = "test_pairs"
    views = 2
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "s_stages", "t_stages", "s_feat", "t_feat"})
    seen: ClassVar[list[StudentStep]] = []

    def forward(self, step: StudentStep) -> torch.Tensor:
        type(self).seen.append(step)
        return step.s_logits.new_zeros(())


register(_Adapter)
register(_Pairs)


def test_parameter_groups_and_own_optimisers(student_side: Any) -> None:
    side = student_side({"kd": 1.0, "test_adapter": 1.0, "na": 1.0})[1]
    opt, own = side.optimizers("sgd", 0.05, 5e-4)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["params"] == [side.terms["test_adapter"].scale]
    assert len(own) == 1 and own[0].param_groups[0]["params"] == [side.terms["na"].theta]
    student_ids = {id(p) for p in side.student.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == student_ids


def test_a_term_on_for_part_of_training_says_so_and_a_capability_is_found_by_name(student_side: Any) -> None:
    """DDP must look for unused parameters exactly when a term is off part of the time (the side says so, from
    the term's own schedule); a synthesizer finds the rotation head by the capability, not by a term's name."""
    assert not student_side({"kd": 1.0})[1].part_time
    assert not student_side({"kd": 1.0, "striplet": 0.1})[1].part_time  # published default: always on
    assert student_side({"kd": 1.0, "striplet": 0.1}, {"striplet": {"custom_steps": 0.5}})[1].part_time
    side = student_side({"kd": 1.0, "rot": 1.0})[1]
    assert side.provider("rotation_head") is side.terms["rot"]
    assert student_side({"kd": 1.0})[1].provider("rotation_head") is None


def test_term_modules_train_are_resumed_and_stay_out_of_the_student(tmp_path: Path, mnist_test,
                                                                    student_side: Any) -> None:
    """Two epochs straight equal one epoch, a stop, and a resumed second epoch: term modules included."""
    images = mnist_test.images[:128]
    cfg = Distillation(epochs=2, batch_size=32, lr=0.05, augment=AugmentConfig(crop_pad=0))

    def run(out: str, epochs_then_stop: int | None = None) -> StudentSide:
        side = student_side({"kd": 1.0, "test_adapter": 1.0, "na": 1.0})[1]
        teacher = _nets()[0]
        resume = StateFile.for_output(tmp_path / out, {"k": 1})

        def stop(row: dict[str, float]) -> None:
            if epochs_then_stop is not None and row["epoch"] == epochs_then_stop:
                raise KeyboardInterrupt

        try:
            distill(teacher, side, BankFeed(images, mnist_test.labels[:128], torch.device("cpu")), mnist_test,
                    cfg, ENGINE, resume, on_epoch=stop)
        except KeyboardInterrupt:
            pass
        return side

    straight = run("a")
    run("b", epochs_then_stop=1)
    resumed = run("b")
    for name in ("test_adapter", "na"):
        for p, q in zip(straight.terms[name].parameters(), resumed.terms[name].parameters(), strict=True):
            assert torch.equal(p, q), name
    assert not torch.equal(straight.terms["na"].theta, torch.zeros(10, 10))  # it trained
    assert straight.terms["test_adapter"].scale.grad is not None
    assert set(straight.student.state_dict()) == set(_nets()[1].state_dict())  # only the student's weights


def test_two_view_batches_and_features_by_stage(mnist_test, student_side: Any) -> None:
    """A term asking for 2 views gets each image twice, independently augmented, with both networks' features."""
    _Pairs.seen.clear()
    side = student_side({"kd": 1.0, "test_pairs": 1.0})[1]
    cfg = Distillation(epochs=1, batch_size=16, kd_steps=1, augment=AugmentConfig(crop_pad=4))
    distill(_nets()[0], side, BankFeed(mnist_test.images[:16], mnist_test.labels[:16], torch.device("cpu")),
            mnist_test, cfg, ENGINE)
    step = _Pairs.seen[-1]
    assert step.views == 2 and step.x.shape[0] == 32 and step.s_logits.shape == (32, 10)
    assert torch.equal(step.labels[:16], step.labels[16:])
    assert not torch.equal(step.x[:16], step.x[16:])  # independent crops of the same images
    assert list(step.s_stages) == [s.path for s in stage_outputs(side.student, 1, 32)]
    assert step.s_stages["net.features.1"].shape == (32, 8, 5, 5) and step.t_stages["net.features.1"].shape[1] == 16
    assert step.s_feat is not None and step.s_feat.shape == (32, 42) and step.t_feat is not None


def test_a_labels_only_objective_skips_the_teacher(mnist_test, monkeypatch: pytest.MonkeyPatch,
                                                   student_side: Any) -> None:
    teacher = _nets()[0]
    calls = []
    monkeypatch.setattr(teacher, "forward", lambda x: calls.append(x) or torch.zeros(x.shape[0], 10))
    side = student_side({"ce": 1.0})[1]
    cfg = Distillation(epochs=1, batch_size=16, kd_steps=2)
    distill(teacher, side, BankFeed(mnist_test.images[:32], mnist_test.labels[:32], torch.device("cpu")),
            mnist_test, cfg, ENGINE)
    assert calls == []


# ----------------------------------------------------------------------------------------- synthesis side
def test_a_term_a_synthesizer_cannot_serve_is_refused_when_built() -> None:
    teacher = _nets()[0]
    with pytest.raises(DfkdError, match=r"fast: weights\.xn: the xn term needs coupling"):
        build_synthesizer("fast", teacher, INFO, {"weights": {"xn": 1.0}, "batch_size": 8}, ENGINE)
    plain = build_model("lenet5", 10, 1, INFO.mean, INFO.std, batchnorm=False)
    with pytest.raises(DfkdError, match=r"no BatchNorm2d layer; methods that need none: dafl .* dfad .* dfnd"):
        build_synthesizer("deepinversion", plain, INFO, {"batch_size": 8}, ENGINE)


def test_term_options_are_the_terms_own_and_checked() -> None:
    teacher = _nets()[0]
    with pytest.raises(DfkdError, match=r"unknown param\(s\) terms\.adv\.order"):
        build_synthesizer("nayer", teacher, INFO, {"terms": {"adv": {"order": "x"}}, "batch_size": 10}, ENGINE)
    with pytest.raises(DfkdError, match=r"terms\.nope: no such loss term"):
        build_synthesizer("nayer", teacher, INFO, {"terms": {"nope": {}}, "batch_size": 10}, ENGINE)
    synth = build_synthesizer("cpnet", teacher, INFO, {"terms": {"adv": {"kl_order": "student_teacher"},
                                                                 "align": {"label_smoothing": 0.2}},
                                                       "batch_size": 10, "g_steps": 1}, ENGINE)
    assert synth.term_options("adv").kl_order == "student_teacher"
    assert synth.inverse.delta == pytest.approx(torch.log(torch.tensor(0.8 * 9 / 0.2)).item())


def test_the_student_runs_when_any_active_term_needs_it() -> None:
    """CPNet's alignment needs the student's logits: it must not switch off because adv has weight 0."""
    teacher, student = _nets()
    synth = build_synthesizer("cpnet", teacher, INFO, {"weights": {"oh": 1.0, "adv": 0.0, "align": 1.0},
                                                       "batch_size": 10, "g_steps": 1}, ENGINE)
    assert "s_logits" in synth.needs
    x = torch.rand(10, 1, 32, 32)
    assert synth.context(x, torch.arange(10), student).s_logits is not None
    quiet = build_synthesizer("nayer", teacher, INFO, {"weights": {"oh": 1.0, "bn": 1.0, "adv": 0.0}, "batch_size": 10},
                              ENGINE)
    assert quiet.context(x, torch.arange(10), student).s_logits is None  # nobody needs it: not computed


@SYNTHESIZERS.register("test_ascent")
class _Ascent(Synthesizer):
    """Gradient *ascent* on the l2 term: every step makes the loss worse, so the lowest-loss iterate is the first."""

    name = "test_ascent"
    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 5
        weights: dict[str, float] = field(default_factory=lambda: {"l2": 1.0})
        augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=0))

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        p = torch.full((2, 1, 32, 32), 0.5, requires_grad=True)
        opt = torch.optim.SGD([p], lr=10.0, maximize=True)

        def step() -> tuple[torch.Tensor, Context]:
            return p * 1.0, self.context(p * 1.0, None)

        best_x, best_loss, logs = self.optimise(self.cfg.g_steps, step, opt)
        return SynthResult(best_x, torch.zeros(2), {**logs, "best": best_loss})


def test_the_shared_round_loop_keeps_the_lowest_loss_iterate() -> None:
    synth = build_synthesizer("test_ascent", _nets()[0], INFO, {}, ENGINE)
    result = synth.synthesize(0)
    assert torch.allclose(result.images, torch.full((2, 1, 32, 32), 0.5))
    assert result.logs["best"] == pytest.approx(0.25) and result.logs["loss"] > 0.25


# ----------------------------------------------------------------------------------------- stage features
def test_stage_outputs_for_the_zoo_without_touching_the_random_stream() -> None:
    expected = {"resnet18": ["net.layer1", "net.layer2", "net.layer3", "net.layer4"],
                "wrn_16_1": ["net.block1", "net.block2", "net.block3"],
                "lenet5": ["net.features.0.2", "net.features.0", "net.features.1.2", "net.features.1",
                           "net.features"]}
    for arch in MODELS.names():
        c = 1 if arch.startswith("lenet") else 3
        model = build_model(arch, 10, c, (0.5,) * c, (0.25,) * c)
        before = torch.get_rng_state()
        stages = stage_outputs(model, c, 32)
        assert torch.equal(before, torch.get_rng_state()), arch
        assert len(stages) >= 3 and [s.height for s in stages] == sorted({s.height for s in stages}, reverse=True)
        if arch in expected:
            assert [s.path for s in stages] == expected[arch], arch


def test_checkpoint_holds_only_the_students_weights(tmp_path: Path, teacher_ckpt: Path, student_side: Any) -> None:
    from dfkd_common import __version__
    from dfkd_common.checkpoint import ModelMeta, now, save_model

    side = student_side({"kd": 1.0, "na": 1.0})[1]
    save_model(tmp_path / "s.safetensors", side.student,
               ModelMeta("lenet5_half", {}, INFO, {}, {}, now(), __version__, "student"))
    loaded, _ = load_model(tmp_path / "s.safetensors")
    assert set(loaded.state_dict()) == set(side.student.state_dict())
