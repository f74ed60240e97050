"""DFAD and Fast: the direction of each update, and tiny end-to-end runs on real mnist5k test digits."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.engine import Engine, details_path
from dfkd_common.errors import DfkdError
from dfkd_common.functional import l1_discrepancy
from dfkd_common.models import build_generator, build_model
from dfkd_common.models.hooks import BNStats
from dfkd_common.online import build_online_feed, recording
from dfkd_common.student import STUDENT_TERMS, StudentStep
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.fast import accumulate_grads


def _engine() -> Engine:
    return Engine.create("cpu", amp=False)


def test_l1_student_loss_is_mean_abs_logit_gap() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    term = STUDENT_TERMS.get("l1")({}, None)  # type: ignore[arg-type]
    loss = term(StudentStep(torch.zeros(8), torch.zeros(8), s, t))
    assert torch.isclose(loss, (s - t).abs().mean())


def test_dfad_generator_step_increases_discrepancy(teacher_ckpt: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, meta = load_model(teacher_ckpt)
    info = meta.dataset
    with recording(tmp_path / "b.h5", teacher, info, _engine(), "dfad", batch_size=64) as ctx:
        feed = build_online_feed("dfad", ctx, {"nz": 16, "ngf": 8, "lr_g": 0.01, "record": 0})
        student = build_model("lenet5_half", 10, 1, info.mean, info.std)
        feed.before_epoch(0, student)
        z = torch.randn(128, 16)

        def gap() -> float:
            with torch.no_grad():
                x = feed.generator(z)  # type: ignore[attr-defined]
                return float(l1_discrepancy(student(x), teacher(x)))

        before = gap()
        for _ in range(5):
            feed.generator_step(64)  # type: ignore[attr-defined]
        assert gap() > before
        assert all(p.grad is None for p in student.parameters())  # the student is not trained by G's step


def test_dfad_ie_option_balances_the_generators_classes(teacher_ckpt: Path, tmp_path: Path) -> None:
    """``ie`` adds DAFL's balance term to the generator loss: the teacher's classes on G(z) become more even."""
    teacher, meta = load_model(teacher_ckpt)
    info = meta.dataset
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))

    def class_entropy(ie: float) -> float:
        torch.manual_seed(0)  # the same generator and student initialisation for both weights
        with recording(tmp_path / f"ie{ie}.h5", teacher, info, _engine(), "dfad", batch_size=64) as ctx:
            feed = build_online_feed("dfad", ctx, {"nz": 16, "ngf": 8, "lr_g": 0.01, "record": 0, "ie": ie})
            feed.before_epoch(0, build_model("lenet5_half", 10, 1, info.mean, info.std))
            for _ in range(15):
                feed.generator_step(64)  # type: ignore[attr-defined]
            with torch.no_grad():
                pbar = torch.softmax(teacher(feed.generator(z)), 1).mean(0)  # type: ignore[attr-defined]
        return float(-(pbar * pbar.clamp_min(1e-8).log()).sum())

    assert class_entropy(10.0) > class_entropy(0.0) + 0.1


def test_dfad_bn_option_moves_the_generators_bn_statistics_toward_the_teachers(teacher_ckpt: Path,
                                                                                tmp_path: Path) -> None:
    """``bn`` adds DeepInversion's prior to the generator loss: G(z)'s statistics at the teacher's BN layers
    approach the running ones (a sign error, or a prior never added, leaves them as far as without it)."""
    teacher, meta = load_model(teacher_ckpt)
    info = meta.dataset
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    probe = BNStats(teacher)
    probe.enable(False)  # off while the feed trains; on only for the measurement

    def bn_distance(bn: float) -> float:
        torch.manual_seed(0)
        with recording(tmp_path / f"bn{bn}.h5", teacher, info, _engine(), "dfad", batch_size=64) as ctx:
            feed = build_online_feed("dfad", ctx, {"nz": 16, "ngf": 8, "lr_g": 0.01, "record": 0, "bn": bn})
            feed.before_epoch(0, build_model("lenet5_half", 10, 1, info.mean, info.std))
            for _ in range(15):
                feed.generator_step(64)  # type: ignore[attr-defined]
            probe.enable(True)
            with torch.no_grad():
                teacher(feed.generator(z))  # type: ignore[attr-defined]
            distance = float(probe.loss())
            probe.enable(False)
        return distance

    assert bn_distance(1.0) < 0.7 * bn_distance(0.0)


def test_dfad_bn_option_needs_a_teacher_with_batchnorm(teacher_ckpt: Path, tmp_path: Path) -> None:
    info = load_model(teacher_ckpt)[1].dataset
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(info.shape), 10))
    with recording(tmp_path / "b.h5", teacher, info, _engine(), "dfad", batch_size=8) as ctx:
        with pytest.raises(DfkdError, match=r"online\.bn needs BatchNorm2d"):
            build_online_feed("dfad", ctx, {"nz": 8, "ngf": 4, "bn": 1.0})


def test_dfad_batches_alternate_generator_and_student_steps(teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher, meta = load_model(teacher_ckpt)
    with recording(tmp_path / "b.h5", teacher, meta.dataset, _engine(), "dfad", batch_size=16) as ctx:
        feed = build_online_feed("dfad", ctx, {"nz": 8, "ngf": 4, "student_steps": 5, "iterations": 3,
                                               "record": 4})
        assert len(feed) == 3 * 5 * 16
        logs = feed.before_epoch(0, build_model("lenet5_half", 10, 1, meta.dataset.mean, meta.dataset.std))
        calls = []
        real = feed.generator_step  # type: ignore[attr-defined]
        feed.generator_step = lambda n: calls.append(n) or real(n)  # type: ignore[attr-defined]
        it = feed.batches(16, torch.Generator())
        for _ in range(11):
            x, y = next(it)
            assert x.shape == (16, 1, 32, 32) and bool((y == -1).all())
        assert len(calls) == 3  # before steps 0, 5 and 10
        assert logs["bank_size"] == 4 and "g_l1" in logs
        feed.finish()
        ctx.job.publish_bank(ctx.header, feed.stats())
    bank = load_bank(tmp_path / "b.h5")
    assert len(bank) == 4 and bank.rounds.tolist() == [0] * 4


def test_accumulate_grads_sums_clone_gradients() -> None:
    meta = torch.nn.Linear(3, 2)
    fast = torch.nn.Linear(3, 2)
    total = torch.zeros_like(meta.weight)
    for _ in range(3):
        fast.zero_grad()
        fast(torch.randn(4, 3)).pow(2).sum().backward()
        total += fast.weight.grad
        accumulate_grads(meta, fast)
    assert meta.weight.grad is not None and torch.allclose(meta.weight.grad, total)


def test_fast_meta_update_moves_meta_generator(teacher_ckpt: Path) -> None:
    teacher, meta = load_model(teacher_ckpt)
    info = meta.dataset
    synth = build_synthesizer("fast", teacher, info, {"batch_size": 32, "g_steps": 3, "nz": 16, "ngf": 8,
                                                      "augment": {"crop_pad": 2, "flip": False}}, _engine())
    student = build_model("lenet5_half", 10, 1, info.mean, info.std).eval()
    before = [p.detach().clone() for p in synth.generator.parameters()]  # type: ignore[attr-defined]
    result = synth.synthesize(0, student)
    after = list(synth.generator.parameters())  # type: ignore[attr-defined]
    moved = [not torch.allclose(a, b) for a, b in zip(after, before, strict=True)]
    assert sum(moved) >= len(moved) - 1  # every layer that got a gradient moved
    assert result.images.shape == (32, 1, 32, 32) and 0 <= result.images.min() and result.images.max() <= 1
    assert {"bn", "oh", "adv"} <= set(result.logs)
    assert synth.bn is not None and all(h.ema is not None for h in synth.bn.hooks)  # momentum BN EMA kept
    # the meta-generator's state survives a round trip (resume)
    state = synth.state_dict()
    other = build_synthesizer("fast", teacher, info, synth.cfg, _engine())
    other.load_state_dict(state)
    for a, b in zip(other.generator.parameters(), after, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)


def test_fast_generator_is_dcgan_sigmoid() -> None:
    g = build_generator("dcgan", nz=8, ngf=4, image_size=32, channels=1, head="sigmoid")
    with torch.no_grad():
        x = g(torch.randn(2, 8))
    assert x.shape == (2, 1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1


# ------------------------------------------------------------------------------------------ end to end
def _e2e(cli: Any, teacher: Path, tmp_path: Path, method: str, profile: dict) -> dict:
    params = {"seed": 0, "distill": {"common": profile}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    t0 = time.perf_counter()
    result = cli("distill", "--online", method, "--teacher", teacher, "--out", tmp_path / "s.safetensors",
                 "--params", tmp_path / "params.yaml", "--metrics", tmp_path / "m.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads(details_path(tmp_path / "m.json").read_text())
    metrics["wall"] = time.perf_counter() - t0
    return metrics


@pytest.mark.slow
def test_dfad_end_to_end_beats_chance(teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    metrics = _e2e(cli, teacher_ckpt, tmp_path, "dfad", {
        "student": "lenet5_half", "weights": {"kd": 0.0, "l1": 1.0}, "epochs": 4, "batch_size": 64, "lr": 0.1,
        "weight_decay": 5e-4, "optimizer": "sgd", "augment": {"crop_pad": 0},
        "online": {"iterations": 25, "nz": 64, "ngf": 8, "lr_g": 1e-3, "record": 20},
    })
    assert metrics["test_acc"] > 0.6, metrics  # chance is 0.1
    assert metrics["bank_size"] == 4 * 20


@pytest.mark.slow
def test_fast_end_to_end_beats_chance(teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    metrics = _e2e(cli, teacher_ckpt, tmp_path, "fast", {
        "student": "lenet5_half", "terms": {"kd": {"tau": 4.0}}, "epochs": 6, "batch_size": 64,
        "kd_steps": 20, "lr": 0.05, "optimizer": "sgd", "augment": {"crop_pad": 2},
        "online": {"g_loops": 2, "warmup": 2, "warmup_loops": 4, "batch_size": 64, "g_steps": 5, "nz": 64,
                   "ngf": 8, "lr_g": 4e-3, "weights": {"bn": 1.0, "oh": 1.0, "adv": 1.0},
                   "augment": {"crop_pad": 2, "flip": False}},
    })
    assert metrics["test_acc"] > 0.6, metrics
