"""Online distillation: the adversarial term's direction, the feed's bank, and resume after interruption."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import dfkd_common.runs.student_run as student_run
from dfkd_common.bank import load_bank
from dfkd_common.jobs import work_dir
from dfkd_common.models import build_model
from dfkd_common.online import frozen
from dfkd_common.synthesis.losses import Context, adversarial_term, kl_div

FAST_ONLINE = {"method": "fast", "g_loops": 2, "warmup": 1, "warmup_loops": 3, "batch_size": 32, "g_steps": 2,
               "nz": 16, "ngf": 8, "weights": {"bn": 1.0, "oh": 1.0, "adv": 1.0}, "augment": {"crop_pad": 2}}
DFAD_ONLINE = {"method": "dfad", "iterations": 2, "student_steps": 2, "nz": 16, "ngf": 8, "record": 10}


def _params(tmp_path: Path, online: dict[str, Any], loss: str = "kd") -> Path:
    params = {"seed": 0, "distill": {"common": {
        "student": "lenet5_half", "weights": {"kd": 0.0, loss: 1.0}, "epochs": 3, "batch_size": 32, "kd_steps": 2,
        "lr": 0.05, "optimizer": "sgd", "augment": {"crop_pad": 0}, "online": online,
    }}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def distill_run(cli: Any, teacher_ckpt: Path, tmp_path: Path) -> Any:
    """``dfkd distill`` of the session's teacher with a params file, the student and metrics in tmp_path."""

    def run(params: Path, out: str = "s.safetensors") -> Any:
        return cli("distill", "--teacher", teacher_ckpt, "--out", tmp_path / out, "--params", params,
                   "--metrics", tmp_path / f"{out}.json", "--device", "cpu")

    return run


# --------------------------------------------------------------------------------- adversarial term
def test_adversarial_gradient_increases_discrepancy() -> None:
    """Descending L_adv moves inputs where the student agrees with the teacher but imitates it worse."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(20, 5)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(256, 20, requires_grad=True)

    def discrepancy(inp: torch.Tensor) -> torch.Tensor:
        return kl_div(teacher(inp), student(inp), reduce=False)

    loss = adversarial_term(Context(x=x, t_logits=teacher(x), s_logits=student(x)))
    assert loss.item() <= 0
    loss.backward()
    agree = teacher(x).argmax(1) == student(x).argmax(1)
    assert agree.float().mean() > 0.5  # the test needs samples the term is active on
    with torch.no_grad():
        step = x - 0.05 * x.grad / x.grad.abs().max()
        still = agree & (teacher(step).argmax(1) == student(step).argmax(1))
        assert discrepancy(step)[still].mean() > discrepancy(x)[still].mean()


def test_frozen_blocks_parameter_gradients_and_restores() -> None:
    model = build_model("lenet5_half", 10, 1, (0.5,), (0.5,)).train()
    x = torch.rand(4, 1, 32, 32, requires_grad=True)
    with frozen(model):
        assert not model.training
        model(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------ online
def _check_bank(path: Path, expected_rounds: list[int], rows_per_round: dict[int, int]) -> None:
    bank = load_bank(path)
    rounds = bank.rounds.numpy()
    assert sorted(set(rounds.tolist())) == expected_rounds
    for r in expected_rounds:
        assert int((rounds == r).sum()) == rows_per_round.get(r, rows_per_round.get(-1, 0))
    assert np.all(np.diff(rounds) >= 0)  # rounds in order: no duplicate appended after a resume
    assert "teacher_logits" in bank.extra
    assert not work_dir(path).exists()


# warm-up epoch 0 makes 3 rounds of 32, then 2 per epoch; DFAD records 10 images per epoch
FAST_CASE = (FAST_ONLINE, "kd", list(range(7)), {-1: 32})
DFAD_CASE = (DFAD_ONLINE, "l1", list(range(3)), {-1: 10})


@pytest.mark.parametrize(("online", "loss", "rounds", "rows", "where"), [
    (*FAST_CASE, "after_epoch"), (*FAST_CASE, "mid_synthesis"), (*DFAD_CASE, "mid_synthesis"),
], ids=["fast-after-epoch", "fast-mid-synthesis", "dfad-mid-epoch"])
def test_online_resume_after_interruption(
    teacher_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    online: dict[str, Any], loss: str, rounds: list[int], rows: dict[int, int], where: str, distill_run: Any,
) -> None:
    """Kill a run in epoch 2 (after its KD steps, or inside its synthesis), rerun: every round exactly once."""
    params = _params(tmp_path, online, loss)
    real = student_run.distill

    class Injected(RuntimeError):
        pass

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        feed = args[2]
        if where == "after_epoch":
            def on_epoch(row: dict[str, float]) -> None:
                if row["epoch"] == 2:  # epoch 2's rows are committed to the work file, its state is not saved
                    raise Injected("injected")
            return real(*args, on_epoch=on_epoch, **kwargs)
        original = feed.before_epoch

        def before_epoch(epoch: int, side: torch.nn.Module) -> dict[str, float]:
            if epoch == 1:
                first = feed.record

                def record_then_fail(*a: Any, **k: Any) -> None:
                    first(*a, **k)
                    raise Injected("injected mid-synthesis")

                feed.record = record_then_fail  # type: ignore[method-assign]
            return original(epoch, side)

        feed.before_epoch = before_epoch  # type: ignore[method-assign]
        return real(*args, **kwargs)

    monkeypatch.setattr(student_run, "distill", interrupted)
    result = distill_run(params)
    assert isinstance(result.exception, Injected)
    assert work_dir(tmp_path / "s.bank.h5").exists() and not (tmp_path / "s.bank.h5").exists()
    monkeypatch.setattr(student_run, "distill", real)
    result = distill_run(params)
    assert result.exit_code == 0, result.output
    _check_bank(tmp_path / "s.bank.h5", rounds, rows)
    assert load_bank(tmp_path / "s.bank.h5").attrs["method"] == online["method"]


def test_online_unknown_method_fails_cleanly(teacher_ckpt: Path, tmp_path: Path, distill_run: Any) -> None:
    result = distill_run(_params(tmp_path, {"method": "nope"}))
    assert result.exit_code == 2
    assert "unknown online method 'nope'" in result.output


def test_dfad_refuses_initial_bank_param_typos(teacher_ckpt: Path, tmp_path: Path, distill_run: Any) -> None:
    result = distill_run(_params(tmp_path, {**DFAD_ONLINE, "g_step": 3}, "l1"))
    assert result.exit_code == 2
    assert "dfad online: unknown param(s) g_step" in result.output
