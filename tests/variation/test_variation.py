"""``dfkd augment``: variation models, the teacher filter, provenance, resume, bad input, and the prior's quality."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd_common.bank import BankWriter, concat_banks, load_bank
from dfkd_common.checkpoint import file_checksum, load_model
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.inspect import bank_summary, save_pairs_grid
from dfkd_common.jobs import work_dir
from dfkd_common.variation.augment import BankAugmentation, augment_bank, convert, embed, variation_seed, vary_and_score
from dfkd_common.variation.models import SDEditPrior, open_variation_model
from dfkd_common.variation.prior import random_prior_like

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[2]
PRIOR = REPO / "priors" / "offline-pool-32x1"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised prior of toy width in the trained prior's layout (dfkd_prior.json: t_max 0.7)."""
    from diffusers import DDPMPipeline

    from dfkd_common.variation.prior import PriorConfig, build_scheduler, build_unet

    torch.manual_seed(0)
    cfg = PriorConfig(widths=[8, 16], attention=[False, False], layers_per_block=1)
    out = tmp_path_factory.mktemp("prior") / "tiny"
    DDPMPipeline(unet=build_unet(32, 1, cfg), scheduler=build_scheduler(cfg)).save_pretrained(out)
    (out / "dfkd_prior.json").write_text(json.dumps({"config": {"t_max": 0.7}}))
    return out


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory: pytest.TempPathFactory, mnist_test) -> Path:
    """24 real digits as a synthetic-kind bank (labels = the digits, rounds 0-2)."""
    path = tmp_path_factory.mktemp("bank") / "digits.h5"
    with BankWriter(path, channels=1, image_size=32, kind="synthetic", method="test",
                    dataset=mnist_test.info.to_dict()) as w:
        w.append(mnist_test.images[:24], mnist_test.labels[:24], torch.arange(24) % 3)
    return path


def run(teacher_ckpt: Path, bank: Path, model: str | Path, out: Path, **cfg: object) -> dict[str, object]:
    engine = Engine.create("cpu", amp=False, channels_last=False)
    teacher, meta = load_model(teacher_ckpt, engine.device)
    variation = dict(cfg.pop("variation", {"steps": 2}))  # type: ignore[call-overload]
    on_batch = cfg.pop("on_batch", None)
    c = BankAugmentation(**{"batch_size": 8, "flush_every": 1, **cfg})  # type: ignore[arg-type]
    vm = open_variation_model(str(model), engine.device, variation)
    return augment_bank(teacher, meta, teacher_ckpt, load_bank(bank), vm, out, engine, c, on_batch=on_batch)


def test_model_specs_resolve_by_directory_class_and_refuse_what_they_cannot_load(tmp_path: Path,
                                                                                 tiny_prior: Path) -> None:
    assert isinstance(open_variation_model(str(tiny_prior), CPU), SDEditPrior)  # by model_index.json's class
    assert isinstance(open_variation_model(f"sdedit-prior:{tiny_prior}", CPU), SDEditPrior)
    with pytest.raises(DfkdError, match="no such directory"):
        open_variation_model(str(tmp_path / "missing"), CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="not a diffusers pipeline"):
        open_variation_model(str(tmp_path / "empty"), CPU)
    with pytest.raises(DfkdError, match="is a DDPMPipeline, not a StableDiffusionImageVariationPipeline"):
        open_variation_model(f"sd-image-variations:{tiny_prior}", CPU)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(DfkdError, match="expected one of"):
        open_variation_model(str(other), CPU)
    with pytest.raises(DfkdError, match="needs a directory"):
        open_variation_model("sdedit-prior", CPU)
    with pytest.raises(DfkdError, match="above the noise levels"):
        open_variation_model(str(tiny_prior), CPU, {"strength": 0.8})  # trained for t_max 0.7
    with pytest.raises(DfkdError, match="unknown param"):
        open_variation_model(str(tiny_prior), CPU, {"strenght": 0.3})


def test_a_variation_depends_only_on_its_own_generator(tiny_prior: Path) -> None:
    """Per-variation noise: the same image from the same seed whatever else is in the batch (what makes a resumed
    run identical to an uninterrupted one), and different seeds give different images."""
    vm = open_variation_model(str(tiny_prior), CPU, {"steps": 3})
    x = torch.rand(3, 1, 32, 32)

    def gens(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    full = vm.vary(x, 2, gens([1, 2, 3, 4, 5, 6]))
    assert full.shape == (6, 1, 32, 32) and float(full.min()) >= 0 and float(full.max()) <= 1
    alone = vm.vary(x[2:], 2, gens([5, 6]))
    torch.testing.assert_close(alone, full[4:], atol=1e-5, rtol=0)
    assert not torch.allclose(vm.vary(x[2:], 2, gens([7, 8])), alone, atol=1e-3)
    assert variation_seed(0, 5, 1) != variation_seed(0, 5, 0) != variation_seed(1, 5, 0)


def test_sdedit_strength_sets_how_far_a_variation_moves(tiny_prior: Path) -> None:
    """More noise, further from the source: with the same seeds, strength 0.6 departs more than 0.1."""
    x = torch.rand(4, 1, 32, 32)
    dist = []
    for strength in (0.1, 0.6):
        vm = open_variation_model(str(tiny_prior), CPU, {"strength": strength, "steps": 2})
        v = vm.vary(x, 1, [torch.Generator().manual_seed(i) for i in range(4)])
        dist.append(float((v - x).abs().mean()))
    assert dist[0] < dist[1]


def test_convert_between_grayscale_rgb_and_sizes() -> None:
    gray = torch.rand(2, 1, 32, 32)
    rgb = convert(gray, 3, 32)
    assert rgb.shape == (2, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    torch.testing.assert_close(convert(rgb, 1, 32), gray)  # luminance of a gray RGB image is the gray
    board = (torch.arange(64).view(1, 64) + torch.arange(64).view(64, 1)) % 2  # 1-pixel checkerboard
    small = convert(board.float().view(1, 1, 64, 64), 1, 16)
    assert small.shape == (1, 1, 16, 16)
    assert abs(float(small.mean()) - 0.5) < 0.02 and float(small.std()) < 0.05  # antialiased: gray, not stripes


def test_augmented_bank_carries_its_provenance_and_only_variations_that_pass_the_filter(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, tiny_prior: Path) -> None:
    out = tmp_path / "aug.h5"
    result = run(teacher_ckpt, digits_bank, tiny_prior, out, k=2, omega=0.5)
    parent, aug = load_bank(digits_bank), load_bank(out)
    assert aug.attrs["kind"] == "augmented" and aug.attrs["method"] == "sdedit-prior"
    assert aug.attrs["parent_checksum"] == file_checksum(digits_bank)
    assert aug.attrs["teacher_checksum"] == file_checksum(teacher_ckpt)
    assert aug.attrs["params"]["model"]["model"] == "sdedit-prior" and aug.attrs["params"]["k"] == 2
    stats = aug.attrs["augment"]
    assert stats["made"] == 48 and stats["kept"] == len(aug) == result["kept"]
    assert sum(r["made"] for r in stats["per_class"]) == 48
    assert sum(r["kept"] for r in stats["per_class"]) == len(aug)
    pidx = aug.extra["parent_index"].long()
    assert int(pidx.min()) >= 0 and int(pidx.max()) < len(parent)
    assert torch.equal(aug.labels, parent.labels[pidx]) and torch.equal(aug.rounds, parent.rounds[pidx])
    assert bool((aug.extra["score"] >= 0.5).all())
    # the stored score is the similarity of the stored image's teacher embedding with its source's
    engine = Engine.create("cpu", amp=False, channels_last=False)
    teacher, _ = load_model(teacher_ckpt, engine.device)
    v_emb, _ = embed(teacher, aug.images, engine)
    s_emb, _ = embed(teacher, parent.images[pidx], engine)
    torch.testing.assert_close(F.cosine_similarity(v_emb, s_emb, dim=1), aug.extra["score"].float(), atol=1e-4,
                               rtol=0)
    summary = bank_summary(out)
    assert summary["augment"]["made"] == 48 and "keep_rate" in summary["per_class"][0]
    png = tmp_path / "pairs.png"
    shown = save_pairs_grid(out, png, rows=4)
    assert png.is_file() and 0 < shown <= 8


def test_omega_and_same_label_decide_what_is_kept(tmp_path: Path, teacher_ckpt: Path, digits_bank: Path,
                                                  tiny_prior: Path) -> None:
    everything = run(teacher_ckpt, digits_bank, tiny_prior, tmp_path / "all.h5", k=1, omega=-1.0)
    assert everything["kept"] == everything["made"] == 24
    strict = run(teacher_ckpt, digits_bank, tiny_prior, tmp_path / "strict.h5", k=1, omega=0.999)
    assert strict["kept"] < 24
    same = run(teacher_ckpt, digits_bank, tiny_prior, tmp_path / "same.h5", k=1, omega=-1.0, same_label=True)
    aug, parent = load_bank(tmp_path / "same.h5"), load_bank(digits_bank)
    engine = Engine.create("cpu", amp=False, channels_last=False)
    teacher, _ = load_model(teacher_ckpt, engine.device)
    _, v_logits = embed(teacher, aug.images, engine)
    _, s_logits = embed(teacher, parent.images[aug.extra["parent_index"].long()], engine)
    assert torch.equal(v_logits.argmax(1), s_logits.argmax(1))
    assert same["kept"] == round(same["label_agreement"] * 24)


def test_an_interrupted_augment_resumes_to_the_uninterrupted_bank(tmp_path: Path, teacher_ckpt: Path,
                                                                  digits_bank: Path, tiny_prior: Path) -> None:
    whole = tmp_path / "whole.h5"
    run(teacher_ckpt, digits_bank, tiny_prior, whole, k=2, omega=-1.0)
    out = tmp_path / "resumed.h5"

    def stop(done: int) -> None:
        if done == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(teacher_ckpt, digits_bank, tiny_prior, out, k=2, omega=-1.0, on_batch=stop)
    assert not out.exists() and work_dir(out).is_dir()
    seen: list[int] = []
    run(teacher_ckpt, digits_bank, tiny_prior, out, k=2, omega=-1.0, on_batch=seen.append)
    assert seen == [24]  # only the last batch was made again
    a, b = load_bank(whole), load_bank(out)
    assert torch.equal(a.images, b.images) and torch.equal(a.extra["parent_index"], b.extra["parent_index"])
    assert a.attrs["augment"]["made"] == b.attrs["augment"]["made"] == 48
    assert not work_dir(out).exists()


def test_nan_from_the_model_stops_with_one_error_and_resumes(tmp_path: Path, teacher_ckpt: Path,
                                                              digits_bank: Path, tiny_prior: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = SDEditPrior.vary
    calls = []

    def poisoned(self: SDEditPrior, images: torch.Tensor, k: int, gens: list[torch.Generator]) -> torch.Tensor:
        calls.append(1)
        out = real(self, images, k, gens)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(SDEditPrior, "vary", poisoned)
    out = tmp_path / "aug.h5"
    with pytest.raises(DfkdError, match="NaN"):
        run(teacher_ckpt, digits_bank, tiny_prior, out, k=1, omega=-1.0)
    assert not out.exists()
    monkeypatch.setattr(SDEditPrior, "vary", real)
    result = run(teacher_ckpt, digits_bank, tiny_prior, out, k=1, omega=-1.0)
    assert result["made"] == 24 and len(load_bank(out)) == 24


def test_concat_banks_trains_on_several_and_refuses_mixed_shapes(tmp_path: Path, digits_bank: Path) -> None:
    a = load_bank(digits_bank)
    both = concat_banks([a, a])
    assert len(both) == 48 and both.attrs["merged_from"] == [str(digits_bank)] * 2
    other = tmp_path / "rgb.h5"
    with BankWriter(other, channels=3, image_size=32, kind="synthetic", method="t", dataset=a.dataset) as w:
        w.append(torch.rand(2, 3, 32, 32), [0, 1], 0)
    with pytest.raises(DfkdError, match="one image shape"):
        concat_banks([a, load_bank(other)])


def test_sd_image_variations_through_diffusers_save_and_load(tmp_path: Path, teacher_ckpt: Path,
                                                               digits_bank: Path) -> None:
    """DDA's model class end to end, offline: a tiny random pipeline saved with save_pretrained, loaded by path,
    grayscale digits to RGB and back, one pipeline call per batch."""
    pytest.importorskip("transformers")
    from dfkd_common.variation.models import SDImageVariations
    from dfkd_common.variation.tiny import build_tiny_sd_variation

    model = build_tiny_sd_variation(tmp_path / "tiny-sd")
    out = tmp_path / "aug.h5"
    result = run(teacher_ckpt, digits_bank, model, out, k=2, omega=-1.0, sources=4, variation={"steps": 2})
    aug = load_bank(out)
    assert aug.image_shape == (1, 32, 32) and len(aug) == 8 == result["made"]
    ident = aug.attrs["params"]["model"]
    assert ident["model"] == "sd-image-variations" and len(ident["fingerprint"]) == 64
    assert ident["params"]["guidance"] == 3.0  # the published default
    vm = open_variation_model(str(model), CPU, {"steps": 2})
    assert isinstance(vm, SDImageVariations) and vm.precision() == "fp32"


def test_augment_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, teacher_ckpt: Path, digits_bank: Path,
                                                              tiny_prior: Path, dfkd: Any, one_line_error: Any) -> None:
    base = ["augment", "--teacher", str(teacher_ckpt), "--bank", str(digits_bank), "--model", str(tiny_prior)]
    out = tmp_path / "aug.h5"
    one_line_error(dfkd(*base, "--out", str(out), "--omega", "1.5"), "omega")
    one_line_error(dfkd(*base, "--out", str(out), "-k", "0"), "k must be >= 1")
    wrong = tmp_path / "rgb.h5"
    with BankWriter(wrong, channels=3, image_size=32, kind="synthetic", method="t",
                    dataset=load_bank(digits_bank).dataset) as w:
        w.append(torch.rand(2, 3, 32, 32), [0, 1], 0)
    proc = dfkd("augment", "--teacher", str(teacher_ckpt), "--bank", str(wrong), "--model", str(tiny_prior),
                "--out", str(out))
    one_line_error(proc, "teacher expects 1x32x32")
    proc = dfkd(*base[:-1], str(tmp_path / "nowhere"), "--out", str(out))
    one_line_error(proc, "no such directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.h5"]


@pytest.mark.slow
def test_the_trained_prior_keeps_the_teachers_label_where_a_random_one_does_not(teacher_ckpt: Path,
                                                                                 mnist_test) -> None:
    """Issue 17's quality bar at the pipeline's strength (0.5, 10 DDIM steps), on real held-out digits: the
    teacher's label is unchanged for >= 60 % of the trained prior's variations, <= 30 % of a random-init one's."""
    engine = Engine.create("cpu", amp=False, channels_last=False)
    teacher, _ = load_model(teacher_ckpt, engine.device)
    src = mnist_test.images[100:196]
    agreement = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("trained", PRIOR), ("random", random_prior_like(PRIOR, Path(tmp) / "random"))):
            vm = open_variation_model(str(path), CPU, {"strength": 0.5, "steps": 10})
            scored = vary_and_score(teacher, vm, src, np.arange(len(src)), 1, 0, engine)
            agreement[name] = float(scored.same.float().mean())
    assert agreement["trained"] >= 0.6, agreement
    assert agreement["random"] <= 0.3, agreement
