"""DFND on pools it was not tuned on: the relevance score and estimate, ``--select auto``, hybrid banks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.data.offline_pool import noise_images
from dfkd_common.data.wild import WildPool
from dfkd_common.engine import Engine, details_path
from dfkd_common.errors import DfkdError
from dfkd_common.models.hooks import BNTypicality
from dfkd_common.relevance import Relevance, estimate, histogram
from dfkd_common.retrieval import RetrieveConfig, TopUpLoop, fill_to, retrieve, teacher_scores
from dfkd_common.synthesis import build_synthesizer
from tests.retrieval.test_dfnd import write_pool

ENGINE = Engine.create("cpu", amp=False, channels_last=False)
TINY_DI = {"batch_size": 32, "g_steps": 5, "amp": False, "channels_last": False}


# ------------------------------------------------------------------------------------------ the score
def test_bn_typicality_is_zero_at_the_running_statistics_and_grows_off_them() -> None:
    bn = nn.BatchNorm2d(2, eps=1e-12).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    z = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    z = (z - z.mean((2, 3), keepdim=True)) / z.std((2, 3), unbiased=False, keepdim=True)  # mean 0, var 1 per map
    at = (z * bn.running_var.sqrt()[:, None, None] + bn.running_mean[:, None, None]).float()
    hooks = BNTypicality(nn.Sequential(bn))
    bn(at)
    assert torch.allclose(hooks.scores, torch.zeros(3), atol=1e-5)
    shifted = at.clone()
    shifted[:, 0] += 2.0  # one running sd up in channel 0: m = 1 there, averaged over 2 channels
    hooks.reset()
    bn(shifted)
    assert torch.allclose(hooks.scores, torch.full((3,), 0.5), atol=1e-4)
    wider = at.clone()
    wider[:, 1] = (wider[:, 1] + 1.0) * np.e**0.5 - 1.0  # variance x e in channel 1: (log v)^2 = 1, halved
    hooks.reset()
    bn(wider)
    assert torch.allclose(hooks.scores, torch.full((3,), 0.5), atol=1e-4)
    hooks.remove()
    hooks.reset()
    bn(shifted)
    assert hooks.scores is None  # removed hooks record nothing


def test_the_teacher_tells_digits_from_noise_by_bn_typicality_not_by_confidence(teacher_ckpt: Path,
                                                                                mnist_test) -> None:
    teacher, _ = load_model(teacher_ckpt)
    rel = Relevance(teacher)
    assert rel.kind == "bn"
    noise = noise_images(256, 32, 1, np.random.default_rng(1))
    digits = teacher_scores(teacher, mnist_test.images[:256], ENGINE)
    d_rel = rel.of(digits)
    n_rel = rel.of(teacher_scores(teacher, noise, ENGINE))
    rel.remove()
    assert d_rel.median() * 2 < n_rel.median()
    assert (d_rel < n_rel.quantile(0.01)).float().mean() > 0.9


# ------------------------------------------------------------------------------------------ the estimate
def _lognormal(n: int, mu: float, sd: float, seed: int) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(mu, sd, n))


@pytest.mark.parametrize("relevant", [300, 3000, 20000])
def test_estimate_counts_a_low_mode_among_others(relevant: int) -> None:
    others = np.concatenate([_lognormal(20000, 3.2, 0.6, 1), _lognormal(3000, 1.9, 0.25, 2)])
    reference = _lognormal(512, 1.9, 0.4, 3)
    pool = np.concatenate([_lognormal(relevant, 0.2, 0.35, 4), others])
    est = estimate(histogram(pool), reference, "bn")
    assert abs(est.count - relevant) <= 0.1 * relevant, est
    assert est.cut is not None and est.mode is not None and est.mode < est.cut


def test_estimate_says_none_where_nothing_is_more_typical_than_noise() -> None:
    reference = _lognormal(512, 1.9, 0.4, 3)
    pool = np.concatenate([_lognormal(20000, 3.2, 0.6, 1), _lognormal(3000, 1.9, 0.25, 2)])
    est = estimate(histogram(pool), reference, "bn")
    assert est.count == 0 and est.cut_bin == 0 and "noise" in est.reason
    assert estimate(histogram(np.zeros(0)), reference, "bn").count == 0


def test_estimate_keeps_a_pool_that_is_all_relevant() -> None:
    est = estimate(histogram(_lognormal(5000, 0.2, 0.4, 4)), _lognormal(512, 1.9, 0.4, 3), "bn")
    assert est.count >= 0.95 * 5000


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5, 0.9])
def test_estimate_on_real_digits_mixed_with_noise_in_known_proportions(teacher_ckpt: Path, mnist_test,
                                                                       share: float) -> None:
    teacher, _ = load_model(teacher_ckpt)
    rng = np.random.default_rng(int(share * 100))
    n = 1000 if share < 0.9 else 1110
    k = round(share * n)
    digits = mnist_test.images[torch.from_numpy(rng.permutation(len(mnist_test.images))[:k])]
    pool = torch.cat([digits, noise_images(n - k, 32, 1, rng)])  # the offline pool's noise, other draws
    rel = Relevance(teacher)
    scores = rel.of(teacher_scores(teacher, pool, ENGINE)).numpy()
    reference = rel.reference(teacher, 1, 32, ENGINE, seed=0)
    rel.remove()
    est = estimate(histogram(scores), reference, rel.kind)
    assert abs(est.count - k) <= 0.2 * k, (est, k)


def test_fill_to_tops_up_the_classes_with_fewest_first() -> None:
    kept = np.array([50, 0, 10, 30])
    add = fill_to(kept, 120)
    assert add.sum() == 30 and (add >= 0).all()
    assert list(kept + add) == [50, 20, 20, 30]
    assert list(kept + fill_to(kept, 121)) == [50, 21, 20, 30]  # the remainder: the lowest-index class
    assert (fill_to(kept, 80) == 0).all() and (fill_to(kept, 90) == 0).all()
    assert list(fill_to(np.array([0, 0, 0]), 7)) == [3, 2, 2]


def test_top_up_targets_only_the_classes_it_is_given(teacher_ckpt: Path, mnist_test) -> None:
    teacher, meta = load_model(teacher_ckpt)
    synth = build_synthesizer("deepinversion", teacher, meta.dataset, {"batch_size": 12}, ENGINE, seed=0)
    synth.classes = torch.tensor([3, 3, 7])
    y = synth.targets(12, 0)
    assert sorted(y.tolist()) == [3] * 8 + [7] * 4


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture
def sparse_pool(tmp_path: Path, mnist_test) -> Path:
    """80 real digits among 800 noise images (9 % relevant): the two pool sources name them."""
    noise = noise_images(800, 32, 1, np.random.default_rng(5))
    write_pool(tmp_path / "noise.h5", noise, names=["noise"])
    pick = torch.from_numpy(np.random.default_rng(6).permutation(len(mnist_test.images))[:80])
    write_pool(tmp_path / "digits.h5", mnist_test.images[pick],
               names=["digits"])
    return tmp_path


def test_select_auto_keeps_the_relevant_images_and_fixed_keeps_its_count(teacher_ckpt: Path, sparse_pool: Path,
                                                                           cli: Any) -> None:
    wild = ["--wild", sparse_pool / "noise.h5", "--wild", sparse_pool / "digits.h5"]
    m = sparse_pool / "m.json"
    r = cli("retrieve", "--teacher", teacher_ckpt, *wild, "--out", sparse_pool / "auto.h5", "--metrics", m,
            "-n", 200, "--select", "auto", "--params", sparse_pool / "none.yaml")
    assert r.exit_code == 0, r.output
    assert "relevant (bn score): about" in " ".join(r.output.split())
    auto = json.loads(details_path(m).read_text())
    assert 64 <= auto["relevance"]["count"] <= 96 and auto["selected"] == auto["relevance"]["count"]
    assert auto["per_source"]["digits"] >= 0.9 * auto["selected"]
    r = cli("retrieve", "--teacher", teacher_ckpt, *wild, "--out", sparse_pool / "fixed.h5", "--metrics", m,
            "-n", 200, "--params", sparse_pool / "none.yaml")
    assert r.exit_code == 0, r.output
    fixed = json.loads(details_path(m).read_text())
    assert fixed["selected"] == 200 and fixed["relevance"]["count"] == auto["relevance"]["count"]


def test_hybrid_bank_rows_name_their_source(teacher_ckpt: Path, sparse_pool: Path, cli: Any) -> None:
    m, out = sparse_pool / "m.json", sparse_pool / "hybrid.h5"
    sets = [a for k, v in TINY_DI.items() for a in ("--set", f"top_up_params.{k}={json.dumps(v)}")]
    r = cli("retrieve", "--teacher", teacher_ckpt, "--wild", sparse_pool / "noise.h5", "--wild",
            sparse_pool / "digits.h5", "--out", out, "--metrics", m, "-n", 150, "--select", "auto", "--balance",
            "--top-up", "deepinversion", *sets, "--params", sparse_pool / "none.yaml")
    assert r.exit_code == 0, r.output
    got = json.loads(details_path(m).read_text())
    bank = load_bank(out)
    names = bank.attrs["source_names"]
    assert names == ["noise", "digits", "deepinversion"]
    source = bank.extra["source"].long()
    made = source == 2
    assert len(bank) == 150 and int(made.sum()) == 150 - got["relevance"]["count"] == got["per_source"]["deepinversion"]
    assert (bank.rounds[made] > 0).all() and (bank.rounds[~made] == 0).all()
    assert (bank.labels == bank.extra["teacher_logits"].float().argmax(1)).all()  # every row: the teacher's label
    counts = np.bincount(bank.labels.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 2  # the classes that lacked images were filled first
    assert got["top_up_missing"] == 0


def test_interrupted_top_up_resumes_to_the_same_bank(teacher_ckpt: Path, sparse_pool: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pool = WildPool.open([str(sparse_pool / "noise.h5"), str(sparse_pool / "digits.h5")], 1, 32)
    cfg = RetrieveConfig(num_select=160, select="auto", top_up="deepinversion", top_up_params=TINY_DI)

    def run(out: str) -> None:  # a fresh teacher each time, as each command loads its own
        teacher, meta = load_model(teacher_ckpt)
        retrieve(teacher, meta, teacher_ckpt, pool, sparse_pool / out, ENGINE, cfg)

    run("a.h5")

    class Stop(Exception):
        pass

    real = TopUpLoop.run

    def crash(self: TopUpLoop, index: int) -> dict[str, Any]:
        if index == 1:
            raise Stop
        return real(self, index)

    monkeypatch.setattr(TopUpLoop, "run", crash)
    with pytest.raises(Stop):
        run("b.h5")
    monkeypatch.setattr(TopUpLoop, "run", real)
    run("b.h5")
    a, b = load_bank(sparse_pool / "a.h5"), load_bank(sparse_pool / "b.h5")
    assert int((a.rounds > 1).sum()) > 0  # rounds after the interruption made rows
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_bad_top_up_and_a_pool_without_relevant_images_are_one_line_errors(teacher_ckpt: Path, sparse_pool: Path,
                                                                             dfkd: Any, one_line_error: Any) -> None:
    base = ["retrieve", "--teacher", teacher_ckpt, "--wild", sparse_pool / "noise.h5", "-n", 50,
            "--params", sparse_pool / "none.yaml"]
    (sparse_pool / "none.yaml").write_text("{}\n")
    one_line_error(dfkd(*base, "--out", sparse_pool / "x.h5", "--top-up", "nosuch"), "not a synthesis method")
    proc = dfkd(*base, "--out", sparse_pool / "y.h5", "--select", "auto")
    one_line_error(proc, "no relevant images")
    assert not (sparse_pool / "y.h5").exists()


def test_a_teacher_without_bn_falls_back_to_confidence() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    rel = Relevance(net)  # type: ignore[arg-type]
    assert rel.kind == "confidence"
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(rel.of(logits), torch.logsumexp(logits, 1) - logits.max(1).values)
    with pytest.raises(DfkdError, match="needs a teacher with BatchNorm2d"):
        Relevance(net, "bn")  # type: ignore[arg-type]


def test_a_generator_method_tops_up_by_the_teacher_s_labels(teacher_ckpt: Path, sparse_pool: Path) -> None:
    """DAFL's generator takes no targets: its rows are kept by the teacher's label while that class lacks images,
    and what it could not make is counted, never padded."""
    teacher, meta = load_model(teacher_ckpt)
    pool = WildPool.open([str(sparse_pool / "noise.h5"), str(sparse_pool / "digits.h5")], 1, 32)
    cfg = RetrieveConfig(num_select=120, select="auto", top_up="dafl",
                         top_up_params={"batch_size": 32, "g_steps": 2, "ngf": 8, "amp": False})
    got = retrieve(teacher, meta, teacher_ckpt, pool, sparse_pool / "dafl.h5", ENGINE, cfg)
    bank = load_bank(sparse_pool / "dafl.h5")
    made = int((bank.extra["source"] == 2).sum())
    assert made > 0 and len(bank) == 120 - got["top_up_missing"] and got["per_source"]["dafl"] == made
