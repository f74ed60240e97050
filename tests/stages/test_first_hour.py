"""A user's first hour: what a stage says about its params and a resume, test folders of other sizes, Ctrl-C at
any moment, help text, grids and exports that explain themselves, offline plots (issue 28)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.data.datasets import folder_split
from dfkd_common.engine import Engine
from dfkd_common.evaluation import evaluate
from dfkd_common.index import COMMANDS
from dfkd_common.inspect import MIN_TILE, save_grid
from dfkd_common.loops.runner import Loop, Runner, StateFile

INFO = get_dataset("mnist5k").info


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` emits inside the block (the CLI may have stopped the dfkd loggers propagating
    in this process, so a handler of its own rather than caplog)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------- params and resume
def test_a_stage_says_where_its_params_came_from(tmp_path: Path, teacher_ckpt: Path, dfkd: Any) -> None:
    """Outside a repository the built-in defaults are named; with a file, the file and the sections used."""
    args = ["distill", "--teacher", teacher_ckpt, "--bank", tmp_path / "none.h5", "--out", tmp_path / "s.safetensors"]
    bare = dfkd(*args, cwd=tmp_path)  # no params.yaml here; the stage then fails on the missing bank
    assert bare.returncode == 2
    assert f"params: built-in defaults (no params.yaml in {tmp_path})" in bare.stdout
    params = tmp_path / "p.yaml"
    params.write_text("distill:\n  common: {epochs: 1}\n  dafl: {lr: 0.01}\n")
    named = dfkd(*args, "--params", params, "--name", "dafl", cwd=tmp_path)
    assert named.stdout.count("params: ") == 1  # said once, though the stage reads its section twice
    assert f"params: {params}, section distill (common + dafl)" in named.stdout


def test_a_name_that_names_no_section_is_one_line_listing_them(tmp_path: Path, teacher_ckpt: Path, dfkd: Any,
                                                               one_line_error: Any) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("distill:\n  common: {epochs: 1}\n  dafl: {}\n  dfnd: {}\n"
                      "retrieve:\n  common: {}\n  dfnd: {}\n")
    proc = dfkd("distill", "--name", "dafll", "--params", params, "--teacher", teacher_ckpt, "--bank", "b.h5",
                "--out", tmp_path / "s.safetensors", cwd=tmp_path)
    one_line_error(proc, "no section distill.dafll (--name names one of: dafl, dfnd)", code=2)
    proc = dfkd("retrieve", "--name", "dfdn", "--params", params, "--teacher", teacher_ckpt, "--wild", "w.h5",
                "--out", tmp_path / "r.h5", cwd=tmp_path)
    one_line_error(proc, "no section retrieve.dfdn (--name names one of: dfnd)", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


class _Count(Loop):
    def __init__(self) -> None:
        self.n = 0

    def run(self, index: int) -> dict[str, Any]:
        self.n += 1
        return {"epoch": index + 1}

    def state_dict(self) -> dict[str, Any]:
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])


def test_a_resumed_run_says_where_it_resumes(tmp_path: Path) -> None:
    store = StateFile.for_output(tmp_path / "t.safetensors", {"a": 1})
    assert store.path.name == ".t.safetensors.state.safetensors"  # the name docs/ARTIFACTS.md gives

    def stop(done: int, logs: Any) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Runner(store, after_unit=stop).run(_Count(), 5, "teacher", "epoch")
    with logged("dfkd.runner") as lines:
        loop = _Count()
        result = Runner(store).run(loop, 5, "teacher", "epoch")
    assert loop.n == 5 and result.resumed_at == 3
    assert lines == [f"teacher: resuming after epoch 3 of 5 (state: {store.path})"]


# ------------------------------------------------------------------------------------------- a test folder
def _mixed_folder(root: Path, mnist_test: Any, n: int = 60) -> Path:
    """Real test digits of every class (the split is sorted by class) as PNGs: a third at 28x28 grey (MNIST's own
    size), a third 32x32 RGB, the rest as given."""
    for i in range(n):
        k = i * len(mnist_test) // n
        img = mnist_test.images[k, 0].numpy()
        folder = root / str(int(mnist_test.labels[k]))
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img, mode="L")
        if i % 3 == 0:
            pil = pil.resize((28, 28), Image.BILINEAR)
        elif i % 3 == 1:
            pil = pil.convert("RGB")
        pil.save(folder / f"{i}.png")
    (root / "0" / "notes.txt").write_text("not an image")
    return root


def test_a_test_folder_says_what_it_converted(tmp_path: Path, mnist_test: Any) -> None:
    root = _mixed_folder(tmp_path / "folder", mnist_test)
    with logged("dfkd.data") as lines:
        split = folder_split(root, INFO)
    assert tuple(split.images.shape) == (60, 1, 32, 32)
    (line,) = lines
    assert line.startswith(f"test set {root}: 60 images in 10 classes, brought to the model's input 1x32x32: ")
    assert "20 converted from RGB to L" in line and "20 resized from 28x28" in line
    assert "1 skipped (not an image)" in line


def test_x_teacher_compares_with_the_teacher_on_the_same_test_folder(tmp_path: Path, teacher_ckpt: Path,
                                                                     mnist_test: Any, small_bank: Any,
                                                                     cli: Any) -> None:
    root = _mixed_folder(tmp_path / "folder", mnist_test)
    bank = small_bank(tmp_path / "b.h5", n=64)
    out = cli("distill", "--teacher", teacher_ckpt, "--bank", bank, "--out", tmp_path / "s.safetensors",
              "--epochs", "1", "--test", root, "--metrics", tmp_path / "m.json", "--params", tmp_path / "p.yaml")
    assert out.exit_code == 0, out.output
    details = json.loads((tmp_path / "m.details.json").read_text())
    teacher, meta = load_model(teacher_ckpt)
    on_folder = evaluate(teacher, folder_split(root, INFO), Engine.create("cpu", amp=False))["test_acc"]
    assert details["teacher_acc"] == pytest.approx(on_folder)
    assert details["ratio_to_teacher"] == pytest.approx(details["test_acc"] / on_folder)
    assert on_folder != pytest.approx(meta.headline)  # 60 digits are not the 1,000 the checkpoint was measured on


# ------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path: Path, teacher_ckpt: Path, delay: float) -> None:
    """While Python imports typer and torch (the first seconds) and once the stage runs."""
    env = {**os.environ, "DFKD_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dfkd"), "synthesize", "-m", "dafl", "--teacher",
                             str(teacher_ckpt), "--out", str(tmp_path / "b.h5"), "--rounds", "50"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["interrupted: rerun the same command to resume"]
    assert not (tmp_path / "b.h5").exists()


# ------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "methods"])
def test_help_has_no_markup_leaks(command: str, dfkd: Any) -> None:
    proc = dfkd(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout and "<bool>" not in proc.stdout and "list[" not in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------- grids
def _first_tile(img: np.ndarray, value: int, size: int) -> tuple[int, int]:
    """The top-left corner of the first tile: the first run of ``size`` pixels of ``value`` (text never has one)."""
    same = (img == value).all(axis=2)
    for y in range(img.shape[0]):
        run = np.convolve(same[y].astype(int), np.ones(size, dtype=int), mode="valid")
        hits = np.nonzero(run == size)[0]
        if len(hits):
            return y, int(hits[0])
    raise AssertionError("no tile in the grid")


def test_class_grid_has_a_title_row_labels_captions_and_empty_cells(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(10)]
    info = INFO.to_dict() | {"class_names": names}
    path = tmp_path / "b.h5"
    logits = torch.full((19, 10), -5.0)
    logits[torch.arange(19), torch.arange(19) % 10] = 5.0
    logits[3] = torch.tensor([9.0] + [0.0] * 9)  # a row of class 3 the teacher sees as c0
    with BankWriter(path, channels=1, image_size=32, kind="synthetic", method="dafl", dataset=info,
                    optional=("teacher_logits",)) as w:  # 19 rows: class 9 has one image only
        w.append(torch.full((19, 1, 32, 32), 77, dtype=torch.uint8), torch.arange(19) % 10, 0,
                 teacher_logits=logits)
    assert save_grid(path, tmp_path / "g.png", per_class=2) == 19
    img = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    tile = -(-MIN_TILE // 32) * 32  # 32x32 images enlarged to at least MIN_TILE
    top, left = _first_tile(img, 77, tile)
    assert (img[:top] < 100).any()  # a title above the tiles
    pitch = tile + 14 + 6  # a tile, its caption line, the padding
    rows = [img[top + r * pitch: top + r * pitch + tile, :left] for r in range(10)]
    assert all((row < 100).any() for row in rows)  # every row is named on the left
    red = (img[..., 0] > 150) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.any()  # the caption of the row the teacher reads as another class
    last_row = img[top + 9 * pitch: top + 9 * pitch + tile, left:]
    assert not (last_row == 0).all(axis=2).any()  # the missing image of class 9 is no black tile
    assert (last_row == 255).all(axis=2).sum() > tile * tile // 2  # it is a blank cell


# ------------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_takes_the_images_a_user_has(fmt: str, tmp_path: Path, teacher_ckpt: Path, mnist_test: Any,
                                               dfkd: Any) -> None:
    """MNIST's own 28x28 digits go straight in: the export resizes them as the training digits were, and gives the
    teacher's predictions on the resized digits; nothing warns; the sidecar says what it takes."""
    out = tmp_path / f"t.{fmt}"
    proc = dfkd("export", teacher_ckpt, "--format", fmt, "--out", out)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["input"]["size"] == "any" and side["input"]["trained_size"] == [32, 32]
    digits28 = torch.nn.functional.interpolate(mnist_test.images[:200].float() / 255, size=(28, 28),
                                               mode="bilinear", antialias=True)
    if fmt == "onnx":
        import onnxruntime as ort

        got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": digits28.numpy()})[0])
    else:
        got = torch.jit.load(str(out))(digits28)
    model, _ = load_model(teacher_ckpt)
    with torch.no_grad():
        expected = model(torch.nn.functional.interpolate(digits28, size=(32, 32), mode="bilinear",
                                                         antialias=fmt == "torchscript"))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == mnist_test.labels[:200]).float().mean() > 0.85


# ------------------------------------------------------------------------------------------- plots
def test_the_plots_page_template_needs_no_network(repo: Path) -> None:
    page = (repo / "assets" / "dvc_plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN scripts have nowhere to go
    assert not re.search(r"<script[^>]+src=", page)
    for lib in ("vega 5.20.2", "vega-lite 5.2.0", "vega-embed 6.18.2"):
        assert f"/* {lib} */" in page
    config = (repo / ".dvc" / "config").read_text()
    assert "html_template = ../assets/dvc_plots/offline.html" in config
    assert "/dvc_plots/" in (repo / ".gitignore").read_text().splitlines()
