"""Shared fixtures, defined once for the whole suite: the trained teacher, the CLI (in a subprocess, as a shell
runs it, and in-process), the one-line-error check, small banks and student sides. Imports the torchvision guard
first, like every entry point."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DFKD_NO_PROGRESS", "1")

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from dfkd_common import __version__
from dfkd_common import tvguard as _tvguard  # noqa: F401
from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import ModelMeta, now, save_model
from dfkd_common.data import get_dataset, load_split
from dfkd_common.engine import Engine, seed_everything
from dfkd_common.loops.teacher_training import TeacherTraining, train_teacher
from dfkd_common.models import build_model
from dfkd_common.student import StudentSide, TermSetup
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
#: what every CLI subprocess of the suite runs with: offline, no progress bars, wide lines, this checkout first
CLI_ENV = {**os.environ, "DFKD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "COLUMNS": "200",
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

# OMP_NUM_THREADS (inherited by the CLI subprocesses too) picks another float path: the suite must hold at 1 and 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def mnist_test():
    return load_split("mnist5k", "test")


@pytest.fixture(scope="session")
def mnist_train():
    return load_split("mnist5k", "train")


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, mnist_train, mnist_test) -> Path:
    """A LeNet-5 (with BN) trained for a few epochs on mnist5k (~96-98 %); trained once per session."""
    seed_everything(0)
    info = mnist_train.info
    model = build_model("lenet5", 10, 1, info.mean, info.std)
    engine = Engine.create("cpu", amp=False)
    loop = TeacherTraining(epochs=6, batch_size=128, lr=0.05, optimizer="sgd", weight_decay=5e-4,
                           augment=AugmentConfig(crop_pad=2), seed=0)
    scores, _ = train_teacher(model, mnist_train, mnist_test, loop, engine)
    path = tmp_path_factory.mktemp("teacher") / "lenet5.safetensors"
    save_model(path, model, ModelMeta("lenet5", {}, info, scores, {}, now(), __version__, "teacher"))
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    """The checkout's root (where params.yaml, dvc.yaml and the studies are)."""
    return ROOT


@pytest.fixture(scope="session")
def dfkd() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``dfkd ARGS`` in a subprocess, as a user's shell runs it; ``check=True`` asserts it succeeded."""

    def run(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 900,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd or ROOT, env={**CLI_ENV, **(env or {})}, timeout=timeout)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        return proc

    return run


@pytest.fixture(scope="session")
def fresh_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Python ``code`` in a fresh interpreter (what a new process imports, and what it does not); ``check=True``
    asserts it succeeded."""

    def run(code: str, cwd: Path | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, capture_output=True, text=True,
                              timeout=timeout, env=CLI_ENV)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    """``dfkd ARGS`` in this process (typer's runner: fast, and monkeypatches reach the stage's library calls). A
    ``--params`` file that does not exist is created empty, so the repo's params.yaml never leaks into a run."""
    runner = CliRunner()

    def invoke(*args: object) -> Result:
        words = [str(a) for a in args]
        if "--params" in words and not Path(words[words.index("--params") + 1]).exists():
            Path(words[words.index("--params") + 1]).write_text("{}\n")
        return runner.invoke(app, words)

    return invoke


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., None]:
    """Assert a failed command said one clear line on stderr (no traceback) containing ``pattern`` (any case);
    ``code``: the exit status it must have (default: any failure)."""

    def check(proc: subprocess.CompletedProcess[str], pattern: str, code: int | None = None) -> None:
        assert proc.returncode != 0 if code is None else proc.returncode == code, (proc.returncode, proc.stderr)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert pattern.lower() in lines[0].lower(), lines[0]

    return check


@pytest.fixture(scope="session")
def small_bank() -> Callable[..., Path]:
    """Write a small synthetic mnist5k-shaped bank: ``rounds`` rounds of ``n`` random images, labels 0..9 in
    turn; other keywords go to :class:`~dfkd_common.bank.BankWriter` (``method``, ``params``, ``seed``, ...)."""

    def write(path: Path, n: int = 64, size: int = 32, rounds: int = 1, **header: Any) -> Path:
        info = get_dataset("mnist5k").info
        dataset = info.to_dict() | ({} if info.image_size == (size, size) else {"image_size": [size, size]})
        header = {"kind": "synthetic", "method": "t", "dataset": dataset, **header}
        with BankWriter(path, channels=1, image_size=size, **header) as w:
            for r in range(rounds):
                w.append(torch.rand(n, 1, size, size), torch.arange(n) % 10, r)
        return path

    return write


@pytest.fixture(scope="session")
def student_side() -> Callable[..., tuple[torch.nn.Module, StudentSide]]:
    """An untrained LeNet-5 teacher (eval) and a student side (LeNet-5/2) with the objective ``weights`` and term
    ``options``; ``acc``: the teacher accuracy the terms are told (DFND's noise adaptation reads it)."""
    info = get_dataset("mnist5k").info

    def build(weights: dict[str, float], options: dict[str, Any] | None = None, acc: float | None = 0.9,
              seed: int = 0) -> tuple[torch.nn.Module, StudentSide]:
        torch.manual_seed(seed)
        teacher = build_model("lenet5", 10, 1, info.mean, info.std).eval()
        student = build_model("lenet5_half", 10, 1, info.mean, info.std)
        return teacher, StudentSide(student, weights, options or {}, TermSetup(teacher, student, 1, 32, acc))

    return build
