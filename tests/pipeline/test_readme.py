"""The README's examples run as written: its Python (against a teacher and a bank at the paths they name) and the
"Your teacher in" shell session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import read_meta

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_its_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) == 4  # the h5py snippet, the Python API example, the student term, the loop
    assert "load_model" in blocks[1] and "class CE(StudentTerm)" in blocks[2] and "(Loop)" in blocks[3]


def test_the_student_term_shown_is_the_one_in_the_code() -> None:
    term = python_blocks()[2]
    assert term.strip() in (ROOT / "dfkd_common" / "student" / "ce.py").read_text()


def test_the_bank_and_api_examples_run(tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "artifacts" / "teachers").mkdir(parents=True)
    shutil.copy(teacher_ckpt, tmp_path / "artifacts" / "teachers" / "lenet5.safetensors")
    info = read_meta(teacher_ckpt).dataset
    with BankWriter(tmp_path / "artifacts" / "banks" / "dafl.h5", channels=1, image_size=32, kind="synthetic",
                    method="dafl", dataset=info.to_dict()) as w:
        w.append(torch.rand(12, 1, 32, 32), torch.arange(12) % 10, 0)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    for block in (blocks[0], blocks[1], blocks[3]):
        exec(compile(block, "README.md", "exec"), {})  # the README's own code, as a user would paste it
    out = capsys.readouterr().out
    assert "{'epoch': 3, 'loss': " in out  # the loop example: three epochs, its state cleared after
    assert not list((tmp_path / "artifacts").rglob("*.state*"))
    assert "dafl classification (12, 1, 32, 32)" in out
    assert "teacher classification lenet5 {'test_acc':" in out
    assert "torch.Size([16, 1, 32, 32])" in out and "12 classification dafl" in out


@pytest.mark.slow
def test_your_teacher_in_runs_as_written(tmp_path: Path) -> None:
    """The "Your teacher in" example, pasted into a shell in an empty folder: the own class by file path, imported
    at the 28x28 it takes, trusted by name in the later stages."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Your teacher in"):].split("```bash\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "DFKD_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-euc", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mynet.py:Net28: input 1x28x28" in proc.stdout.replace("\n", " ")
    assert read_meta(tmp_path / "s.safetensors").dataset.image_size == (28, 28)
