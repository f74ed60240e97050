"""DFND: wild pools, retrieval (confidence / balanced / random), the noise-adaptation loss, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dfkd_common.bank import BankWriter, load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.data.wild import WildPool, convert_channels
from dfkd_common.engine import Engine, details_path
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import predict
from dfkd_common.models import build_model
from dfkd_common.retrieval import balanced_quotas, neg_log_pmax
from dfkd_common.student import STUDENT_TERMS, StudentSide, StudentStep, TermSetup
from dfkd_common.student.noise_adaptation import transition_matrix

ENGINE = Engine.create("cpu", amp=False, channels_last=False)


def write_pool(path: Path, images: torch.Tensor, source: int = 0, names: list[str] | None = None) -> Path:
    c, s = int(images.shape[1]), int(images.shape[2])
    info = {"name": "wild", "channels": c, "image_size": s, "num_classes": 0, "class_names": [],
            "mean": [0.5] * c, "std": [0.25] * c}
    w = BankWriter(path, channels=c, image_size=s, kind="merged", method="test", dataset=info,
                   optional=("source",), source_names=names or [path.stem])
    w.append(images, -1, 0, source=source)
    w.close()
    return path


# ------------------------------------------------------------------------------------------- loss
def test_transition_matrix_rows_sum_to_one_with_fixed_diagonal() -> None:
    theta = torch.randn(10, 10) * 3
    q = transition_matrix(theta, 0.93)
    assert torch.allclose(q.sum(1), torch.ones(10), atol=1e-6)
    assert torch.allclose(torch.diagonal(q), torch.full((10,), 0.93))
    assert (q >= 0).all()


def test_dfnd_terms_train_theta_with_its_own_adam(teacher_ckpt: Path) -> None:
    teacher, meta = load_model(teacher_ckpt)
    student = build_model("lenet5_half", 10, 1, meta.dataset.mean, meta.dataset.std)
    setup = TermSetup(teacher, student, 1, 32, meta.headline)
    side = StudentSide(student, {"kd": 1.0, "na": 1.0}, {"kd": {"tau": 4.0}}, setup)
    na = side.terms["na"]
    assert na.acc == pytest.approx(meta.headline)
    opt, own = side.optimizers("sgd", 0.05, 5e-4)
    assert len(own) == 1 and own[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert all(id(p) != id(na.theta) for g in opt.param_groups for p in g["params"])  # not in the student's SGD
    x = torch.rand(8, 1, 32, 32)
    loss, logs = side.objective(StudentStep(x, torch.zeros(8, dtype=torch.long), student(x), teacher(x).detach()))
    loss.backward()
    own[0].step()
    assert {"kd", "na"} <= set(logs)
    assert na.theta.abs().sum() > 0
    assert torch.allclose(na.q().sum(1), torch.ones(10), atol=1e-6)
    # an explicit option wins; without metadata and option the error says what to set
    assert STUDENT_TERMS.get("na")({"teacher_acc": 0.5}, TermSetup(teacher, student, 1, 32)).acc == 0.5
    with pytest.raises(DfkdError, match="teacher_acc"):
        STUDENT_TERMS.get("na")({}, TermSetup(teacher, student, 1, 32, None))


# ------------------------------------------------------------------------------------------ pools
def test_channel_conversion_rules() -> None:
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert convert_channels(rgb, 1).shape == (2, 1, 4, 4)
    assert convert_channels(rgb[:, :1], 3).shape == (2, 3, 4, 4)
    assert convert_channels(torch.cat([rgb, rgb[:, :1]], 1), 3).equal(rgb)
    with pytest.raises(DfkdError, match="cannot convert 2-channel"):
        convert_channels(rgb[:, :2], 1)


def test_folder_pool_nested_formats_and_conversion(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "a" / "x.jpg")
    Image.new("L", (10, 10), 200).save(tmp_path / "a" / "b" / "y.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(tmp_path / "z.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    pool = WildPool.open([str(tmp_path)], channels=1, image_size=16)
    assert len(pool) == 3
    batch = next(iter(pool.loader(range(len(pool)), 8)))
    assert batch["images"].shape == (3, 1, 16, 16) and batch["ok"].all()
    assert abs(float(batch["images"][2].float().mean()) - 200) <= 1  # order: z.webp, a/x.jpg, a/b/y.png


# -------------------------------------------------------------------------------------- selection
def test_balanced_quotas_water_fill() -> None:
    assert balanced_quotas(np.array([1, 100, 100]), 50).tolist() == [1, 25, 24]
    assert balanced_quotas(np.array([5, 5]), 50).tolist() == [5, 5]
    q = balanced_quotas(np.array([30, 40, 50, 60]), 101)
    assert q.sum() == 101 and q.max() - q.min() <= 1


def test_planted_confident_images_are_retrieved_first(teacher_ckpt: Path, mnist_test, tmp_path: Path, cli: Any) -> None:
    teacher, _ = load_model(teacher_ckpt)
    scores = neg_log_pmax(predict(teacher, mnist_test.images, ENGINE))
    planted = mnist_test.images[scores.argsort()[:40]]
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (600, 1, 32, 32), dtype=np.uint8))
    smooth = torch.nn.functional.interpolate(noise[:300, :, :4, :4].float(), size=(32, 32), mode="bilinear")
    distractors = torch.cat([noise[300:], smooth.round().to(torch.uint8), mnist_test.images[scores.argsort()[-200:]]])
    d_scores = neg_log_pmax(predict(teacher, distractors, ENGINE))
    distractors = distractors[d_scores > neg_log_pmax(predict(teacher, planted, ENGINE)).max()]
    assert len(distractors) > 400  # the precondition the test is about: planted images are the surest
    write_pool(tmp_path / "planted.h5", planted)
    write_pool(tmp_path / "distract.h5", distractors)
    out, metrics = tmp_path / "ret.h5", tmp_path / "ret.json"
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", tmp_path / "distract.h5", "--wild",
            tmp_path / "planted.h5", "--out", out, "--metrics", metrics, "-n", 40, "--batch-size", 64,
            "--params", tmp_path / "none.yaml", "--set", "flush_every=1")
    assert r.exit_code == 0, r.output
    m = json.loads(details_path(metrics).read_text())
    assert m["per_source"] == {"distract": 0, "planted": 40}
    bank = load_bank(out)
    assert bank.attrs["kind"] == "retrieved" and len(bank) == 40
    assert set(bank.extra) >= {"score", "source", "teacher_logits"}
    assert (bank.labels == bank.extra["teacher_logits"].float().argmax(1)).all()
    # the random baseline: same size, same pool, mostly distractors
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", tmp_path / "distract.h5", "--wild",
            tmp_path / "planted.h5", "--out", tmp_path / "rand.h5", "--metrics", metrics, "-n", 40, "--random",
            "--params", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    m = json.loads(details_path(metrics).read_text())
    assert m["selected"] == 40 and m["per_source"]["distract"] > 30


def test_balanced_mode_counts_within_one(teacher_ckpt: Path, mnist_test, tmp_path: Path, cli: Any) -> None:
    pool = write_pool(tmp_path / "pool.h5", mnist_test.images)
    metrics = tmp_path / "m.json"
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", pool, "--out", tmp_path / "b.h5", "--metrics", metrics,
            "-n", 205, "--balance", "--params", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    counts = list(json.loads(details_path(metrics).read_text())["per_class"].values())
    assert sum(counts) == 205 and max(counts) - min(counts) <= 1


def test_resumed_scoring_gives_the_same_bank(teacher_ckpt: Path, mnist_test, tmp_path: Path) -> None:
    from dfkd_common.jobs import work_dir
    from dfkd_common.retrieval import RetrieveConfig, retrieve

    teacher, meta = load_model(teacher_ckpt)
    pool_path = write_pool(tmp_path / "pool.h5", mnist_test.images[:300])
    pool = WildPool.open([str(pool_path)], 1, 32)
    cfg = RetrieveConfig(num_select=50, batch_size=32, flush_every=1)
    full = retrieve(teacher, meta, teacher_ckpt, pool, tmp_path / "a.h5", ENGINE, cfg)

    class Stop(Exception):
        pass

    def crash(done: int) -> None:
        if done >= 160:
            raise Stop

    out = tmp_path / "b.h5"
    with pytest.raises(Stop):
        retrieve(teacher, meta, teacher_ckpt, pool, out, ENGINE, cfg, on_batch=crash)
    assert work_dir(out).is_dir() and not out.exists()
    resumed = retrieve(teacher, meta, teacher_ckpt, pool, out, ENGINE, cfg)
    assert resumed["resumed_at"] == 160 and resumed["scored"] == 140
    assert torch.equal(load_bank(tmp_path / "a.h5").images, load_bank(out).images)
    assert full["per_class"] == resumed["per_class"]
    assert not work_dir(out).exists()


# ------------------------------------------------------------------------------------- bad inputs
def test_empty_folder_is_a_one_line_error(teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    (tmp_path / "wild" / "sub").mkdir(parents=True)
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", tmp_path / "wild", "--out", tmp_path / "o.h5",
            "--params", tmp_path / "none.yaml")
    assert r.exit_code == 2
    assert "has no image files" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.h5").exists()


def test_unreadable_image_is_skipped_and_counted(teacher_ckpt: Path, mnist_test, tmp_path: Path, cli: Any) -> None:
    from PIL import Image

    wild = tmp_path / "wild"
    wild.mkdir()
    for i in range(6):
        Image.fromarray(mnist_test.images[i, 0].numpy()).save(wild / f"{i}.png")
    (wild / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    metrics = tmp_path / "m.json"
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", f"folder:{wild}", "--out", tmp_path / "o.h5",
            "--metrics", metrics, "-n", 10, "--params", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable" in r.output
    m = json.loads(details_path(metrics).read_text())
    assert m["unreadable"] == 1 and m["selected"] == 6
    assert len(load_bank(tmp_path / "o.h5")) == 6


def test_unconvertible_channels_and_unknown_sources(teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    pool = write_pool(tmp_path / "two.h5", torch.zeros(4, 2, 8, 8, dtype=torch.uint8))
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", pool, "--out", tmp_path / "o.h5",
            "--params", tmp_path / "none.yaml")
    assert r.exit_code == 2 and "cannot convert 2-channel images to 1 channels" in r.output
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", "nowhere/at/all", "--out", tmp_path / "o.h5",
            "--params", tmp_path / "none.yaml")
    assert r.exit_code == 2 and "not a folder, a bank" in r.output
    r = cli("retrieve", "--teacher", teacher_ckpt, "--out", tmp_path / "o.h5", "--params", tmp_path / "none.yaml")
    assert r.exit_code == 2 and "no wild pool" in r.output


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pool_retrieve_dfnd_distill_beats_chance(teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    pool, bank, student = tmp_path / "pool.h5", tmp_path / "ret.h5", tmp_path / "s.safetensors"
    none = tmp_path / "none.yaml"
    r = cli("pool", "build", "--out", pool, "--params", none, "--set", "digits_variants=2",
            "--set", "photo_crops=1500", "--set", "noise=300")
    assert r.exit_code == 0, r.output
    info = json.loads(json.dumps(load_bank(pool).attrs["source_names"]))
    assert info == ["digits", "skimage", "sklearn", "noise"]
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", pool, "--out", bank, "-n", 2000, "--balance",
            "--params", none)
    assert r.exit_code == 0, r.output
    metrics = tmp_path / "s.json"
    r = cli("distill", "--teacher", teacher_ckpt, "--bank", bank, "--out", student, "--set", "weights.na=1",
            "--metrics", metrics, "--epochs", 4, "--params", none, "--device", "cpu")
    assert r.exit_code == 0, r.output
    acc = json.loads(details_path(metrics).read_text())["test_acc"]
    assert acc > 0.6, acc  # chance is 0.1
