"""DDA: the rotation term's sign on both sides, the head's per-round re-start and resume, the align head, the chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import dfkd_common.runs.student_run as student_run
from dfkd_common.bank import load_bank
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.loops.distillation import BankFeed, TeacherFeatures, make_step
from dfkd_common.models import build_model
from dfkd_common.online import frozen
from dfkd_common.rotation import rotations
from dfkd_common.student import StudentSide, StudentStep, TermSetup
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.losses import TERMS

INFO = get_dataset("mnist5k").info
CIFAR = get_dataset("cifar10").info
ENGINE = Engine.create("cpu", amp=False, channels_last=False)
DDA_OPTIONS = {"kd": {"tau": 20.0}}  # the student objective's KD temperature
REPO = Path(__file__).resolve().parents[2]
NO_AUG = {"augment": {"crop_pad": 0, "flip": False, "jitter": 0.0}}
DDA = {"kd": 1.0, "ce": 1.0, "fea": 30.0, "rot": 1.0}


def _head_ce(side: StudentSide, x: torch.Tensor, y: torch.Tensor) -> float:
    xr, yr = rotations(x, y)
    with torch.no_grad():
        side.student.eval()
        from dfkd_common.models.hooks import Penultimate

        with Penultimate(side.student) as hook:
            side.student(xr)
            return float(torch.nn.functional.cross_entropy(side.terms["rot"].head(hook.value), yr))


def test_rotations_are_rotation_major_with_joint_labels() -> None:
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    xr, yr = rotations(x, torch.tensor([1, 7]))
    assert xr.shape == (8, 1, 3, 3) and yr.tolist() == [4, 28, 5, 29, 6, 30, 7, 31]
    assert torch.equal(xr[2], torch.rot90(x[0], 1, (1, 2))) and torch.equal(xr[6], torch.rot90(x[0], 3, (1, 2)))


def test_the_generator_step_raises_the_heads_ce_and_the_heads_step_lowers_it(student_side: Any) -> None:
    teacher, side = student_side(DDA, DDA_OPTIONS, acc=None)
    synth = build_synthesizer("csd", teacher, INFO, {"weights": {"bn": 0.0, "oh": 0.0, "dda": 1.0}, **NO_AUG}, ENGINE)
    y = torch.arange(32) % 10
    x = torch.rand(32, 1, 32, 32, requires_grad=True)
    before = _head_ce(side, x.detach(), y)
    with frozen(side):
        ctx = synth.context(x, y, side)
        value = TERMS.get("dda")(ctx)
    assert float(value) == pytest.approx(-before, rel=1e-4)  # the term is minus the head's CE
    value.backward()
    assert all(p.grad is None for p in side.parameters())  # head and student fixed during synthesis
    stepped = (x - 20.0 * x.grad).detach()  # gradient descent on the term = ascent on the CE
    assert _head_ce(side, stepped, y) > before + 1e-4

    # the student side: the rot term moves the head (by its own optimiser) and lowers the same CE
    side.train()
    _, own = side.optimizers("sgd", 0.0, 0.0)
    xs = x.detach()
    for _ in range(5):
        step = StudentStep(x=xs, labels=y, s_logits=side.student(xs), t_logits=teacher(xs))
        loss = side.terms["rot"](step)
        own[0].zero_grad()
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in side.student.parameters())  # features detached
        own[0].step()
    assert _head_ce(side, xs, y) < before - 1e-3


def test_the_head_is_reinitialised_after_every_round_from_the_synthesizers_generator(student_side: Any) -> None:
    teacher, side = student_side(DDA, DDA_OPTIONS, acc=None)
    cfg = {"batch_size": 8, "g_steps": 1, "ngf": 8}
    _, own = side.optimizers("sgd", 0.05, 0.0)
    head = side.terms["rot"].head
    first = [p.detach().clone() for p in head.parameters()]
    p0 = next(head.parameters())
    own[0].state[p0]["momentum_buffer"] = torch.ones_like(p0)
    with frozen(side):
        build_synthesizer("csd", teacher, INFO, cfg, ENGINE, seed=3).synthesize(0, side)
    after = [p.detach().clone() for p in head.parameters()]
    assert not torch.equal(first[0], after[0]) and p0 not in own[0].state  # fresh weights, momentum cleared
    _, other = student_side(DDA, DDA_OPTIONS, acc=None, seed=1)
    with frozen(other):
        build_synthesizer("csd", teacher, INFO, cfg, ENGINE, seed=3).synthesize(0, other)
    assert all(torch.equal(a, b) for a, b in zip(after, other.terms["rot"].head.parameters(), strict=True))


def test_dda_without_the_rotation_head_is_one_clear_error(student_side: Any) -> None:
    teacher, side = student_side({"kd": 1.0}, DDA_OPTIONS, acc=None)
    synth = build_synthesizer("csd", teacher, INFO, {"batch_size": 4, "g_steps": 1, "ngf": 8}, ENGINE)
    with pytest.raises(DfkdError, match="rotation head"), frozen(side):
        synth.synthesize(0, side)
    offline = build_synthesizer("csd", teacher, INFO, {"batch_size": 4, "g_steps": 1, "ngf": 8}, ENGINE)
    assert offline.synthesize(0, None).logs["dda"] == 0.0  # no student offline: the term is 0


def test_the_align_head_trains_with_the_student_and_stays_out_of_its_checkpoint(student_side: Any) -> None:
    teacher, side = student_side({"fea": 1.0}, DDA_OPTIONS, acc=None)
    align = side.terms["fea"].align
    assert align[0].in_channels == 60 and align[-1].out_channels == 120  # lenet5_half C5 -> lenet5 C5
    assert all(m.bias is None for m in align if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(16, 1, 32, 32)
    hooks = TeacherFeatures(teacher, side.needs, 1, 32)
    step = make_step((x * 255).to(torch.uint8), torch.zeros(16, dtype=torch.long), side, teacher,
                     torch.nn.Identity(), ENGINE, hooks)
    loss, _ = side.objective(step)
    loss.backward()
    hooks.remove()
    assert side.student.net.features[1][0].weight.grad.abs().sum() > 0  # the MSE reaches the student's convs
    assert align[0].weight.grad.abs().sum() > 0
    opt, _ = side.optimizers("sgd", 0.1, 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(side.student.parameters())) + len(
        list(align.parameters()))  # one optimiser, one schedule
    assert not any("align" in k for k in side.student.state_dict())


@pytest.mark.parametrize("pair", [("resnet34", "resnet18"), ("wrn_40_2", "wrn_16_1"), ("vgg11_bn", "resnet18")])
def test_csd_synthesis_and_the_dda_student_step_for_cifar_pairs(pair: tuple[str, str]) -> None:
    torch.manual_seed(0)
    teacher = build_model(pair[0], 10, 3, CIFAR.mean, CIFAR.std).eval()
    student = build_model(pair[1], 10, 3, CIFAR.mean, CIFAR.std)
    side = StudentSide(student, DDA, {"kd": {"tau": 20.0}}, TermSetup(teacher, student, 3, 32))
    synth = build_synthesizer("csd", teacher, CIFAR, {"batch_size": 8, "g_steps": 1, "ngf": 8}, ENGINE)
    with frozen(side):
        result = synth.synthesize(0, side)
    assert result.images.shape == (8, 3, 32, 32) and result.logs["dda"] < 0
    feed = BankFeed((result.images * 255).to(torch.uint8), result.labels, torch.device("cpu"))
    images, labels = next(iter(feed.batches(8, torch.Generator().manual_seed(0))))
    hooks = TeacherFeatures(teacher, side.needs, 3, 32)
    side.train()
    loss, logs = side.objective(make_step(images, labels, side, teacher, torch.nn.Identity(), ENGINE,
                                          hooks))
    loss.backward()
    hooks.remove()
    assert torch.isfinite(loss) and set(logs) == set(DDA)
    assert side.terms["fea"].align[0].weight.grad is not None


def test_online_csd_alone_runs_ddas_published_student_objective(tmp_path: Path) -> None:
    empty = tmp_path / "p.yaml"
    empty.write_text("{}\n")
    csd = student_run.resolve_run(empty, None, online="csd")
    assert csd.weights == DDA and csd.terms["kd"]["tau"] == 20.0


def _dda_params(tmp_path: Path) -> Path:
    params = {"seed": 0, "distill": {"common": {
        "student": "lenet5_half", "weights": DDA, "terms": {"kd": {"tau": 20.0}}, "epochs": 3, "batch_size": 32,
        "kd_steps": 3, "lr": 0.05, "optimizer": "sgd", "augment": {"crop_pad": 0},
        "online": {"batch_size": 16, "g_steps": 3, "ngf": 8, "nz": 16, "augment": {"crop_pad": 2}},
    }}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_an_interrupted_dda_run_resumes_its_head_and_writes_the_uninterrupted_bank(
        teacher_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    """Epoch 2's round reads the head trained in epoch 1: a resume that lost the head (or its momentum) would
    make other images. Killed after epoch 2, the rerun must write the bank and student of a straight run."""
    params = _dda_params(tmp_path)

    def run(out: str) -> Any:
        return cli("distill", "--online", "csd", "--teacher", teacher_ckpt, "--out", tmp_path / out,
                   "--params", params, "--metrics", tmp_path / f"{out}.json", "--device", "cpu")

    assert run("a.safetensors").exit_code == 0
    real = student_run.distill

    class Injected(RuntimeError):
        pass

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def on_epoch(row: dict[str, float]) -> None:
            if row["epoch"] == 2:
                raise Injected("injected")
        return real(*args, on_epoch=on_epoch, **kwargs)

    monkeypatch.setattr(student_run, "distill", interrupted)
    assert isinstance(run("b.safetensors").exception, Injected)
    monkeypatch.setattr(student_run, "distill", real)
    result = run("b.safetensors")
    assert result.exit_code == 0, result.output
    a, b = load_bank(tmp_path / "a.bank.h5"), load_bank(tmp_path / "b.bank.h5")
    assert len(a) == len(b) == 48 and np.array_equal(a.images, b.images)
    acc = [json.loads((tmp_path / f"{n}.safetensors.json").read_text())["test_acc"] for n in "ab"]
    assert acc[0] == acc[1]


@pytest.mark.slow
def test_the_dda_chain_beats_chance_widely_on_real_digits(tmp_path: Path, teacher_ckpt: Path, dfkd: Any) -> None:
    """csd init bank (dda 0) -> diffusion variations by the committed prior -> dda student on both + online rounds."""
    (tmp_path / "none.yaml").write_text("{}\n")

    def run(*args: str) -> None:
        dfkd(*args, "--params", tmp_path / "none.yaml", check=True)

    init, aug = tmp_path / "csd.h5", tmp_path / "csd_aug.h5"
    run("synthesize", "--method", "csd", "--teacher", str(teacher_ckpt), "--out", str(init),
        "--set", "rounds=4", "--set", "batch_size=64", "--set", "g_steps=20", "--set", "lr_g=0.01",
        "--set", "ngf=16", "--set", "weights.dda=0", "--set", "augment={crop_pad: 2}")
    run("augment", "--bank", str(init), "--teacher", str(teacher_ckpt),
        "--model", str(REPO / "priors/offline-pool-32x1"), "--out", str(aug), "-k", "1", "--sources", "64",
        "--set", "variation={strength: 0.5, steps: 5}")
    run("distill", "--online", "csd", "--teacher", str(teacher_ckpt), "--bank", str(init), "--bank", str(aug),
        "--out", str(tmp_path / "s.safetensors"), "--metrics", str(tmp_path / "m.json"),
        "--set", "epochs=5", "--set", "kd_steps=20", "--set", "batch_size=64", "--set", "online.batch_size=64",
        "--set", "online.g_steps=20", "--set", "online.lr_g=0.01", "--set", "online.ngf=16",
        "--set", "online.augment={crop_pad: 2}")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["test_acc"] > 0.6, metrics  # chance: 0.1 on the 1,000 real held-out digits
    bank = load_bank(tmp_path / "s.bank.h5")
    assert len(bank) == 256 + len(load_bank(aug)) + 5 * 64  # init + kept variations + one round per epoch
