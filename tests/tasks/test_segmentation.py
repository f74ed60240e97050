"""The segmentation task: mIoU and pixel accuracy of known masks, the ignore index, per-pixel KD's sign and
gradient, the bank columns it declares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfkd_common.errors import DfkdError
from dfkd_common.tasks import get_task
from dfkd_common.tasks.segmentation import IGNORE, confusion, iou_per_class


def one_hot_logits(mask: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(mask.long(), k).movedim(-1, 1).float() * 10


def test_miou_of_known_masks() -> None:
    """3 classes on a 2x4 image, IoU worked out by hand."""
    task = get_task("segmentation")
    target = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 0, 0, 1], [1, 2, 2, 0]]])
    scores = task.metrics(one_hot_logits(pred, 3), target)
    # class 0: TP 3, FP 1 (pixel 7), FN 1 -> 3/5; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1, FN 1 -> 1/3
    assert scores["miou"] == pytest.approx((3 / 5 + 1 / 3 + 1 / 3) / 3)
    assert scores["pixel_acc"] == pytest.approx(5 / 8)
    assert task.metrics(one_hot_logits(target, 3), target) == {"miou": 1.0, "pixel_acc": 1.0}


def test_ignored_pixels_and_absent_classes_do_not_count() -> None:
    task = get_task("segmentation")
    target = torch.tensor([[[0, IGNORE], [1, 1]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 3], [1, 1]]])  # the ignored pixel's prediction (class 3) is not counted
    scores = task.metrics(one_hot_logits(pred, 5), target)
    assert scores == {"miou": 1.0, "pixel_acc": 1.0}  # classes 2, 3, 4: in neither, no IoU
    iou = iou_per_class(confusion(pred, target, 5))
    assert iou[:2].tolist() == [1.0, 1.0] and all(math.isnan(v) for v in iou[2:].tolist())


def test_per_pixel_kd_sign_and_gradient() -> None:
    """Zero where the student's per-pixel distributions equal the teacher's, positive elsewhere; its gradient
    moves the student's logits toward the teacher's at every pixel."""
    task = get_task("segmentation")
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 3, 5)
    assert float(task.kd(teacher.clone(), teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 4, 3, 5, requires_grad=True)
    loss = task.kd(student, teacher, 4.0)
    loss.backward()
    assert float(loss) > 0
    stepped = student.detach() - 10.0 * student.grad
    assert float(task.kd(stepped, teacher, 4.0)) < float(loss)
    assert bool((student.grad.abs().sum(1) > 0).all())  # every pixel gets a gradient


def test_columns_targets_and_synthesis() -> None:
    task = get_task("segmentation")
    assert task.target == "masks"
    col = task.target_column(11, (64, 48))
    assert col.dtype == np.uint8 and col.shape == (64, 48)
    assert task.logits_column(11, (64, 48)).shape == (11, 64, 48)
    assert task.predict(torch.randn(2, 11, 4, 4)).dtype == torch.uint8
    task.check_targets(torch.tensor([[0, 10, IGNORE]], dtype=torch.uint8), 11, "bank b")
    with pytest.raises(DfkdError, match="mask value 11"):
        task.check_targets(torch.tensor([[0, 11]], dtype=torch.uint8), 11, "bank b")
    with pytest.raises(DfkdError, match="segmentation"):
        task.draw_targets(4, 0, 11, torch.Generator())


def test_canvases_hold_real_digits_where_their_masks_say() -> None:
    """mnist5k-seg: 64x64 canvases, 11 classes, made the same way on every load; digit pixels differ from the
    photo under them (ink), and a digit's class covers a few percent of the pixels."""
    from dfkd_common.data import get_dataset

    spec = get_dataset("mnist5k-seg")
    assert spec.info.task == "segmentation" and spec.info.num_classes == 11
    test = spec.load("test")
    assert test.images.shape == (1000, 1, 64, 64) and test.labels.shape == (1000, 64, 64)
    assert test.labels.dtype == torch.uint8 and int(test.labels.max()) <= 10
    again = spec.load("test")
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)
    share = torch.bincount(test.labels.flatten().long(), minlength=11).double() / test.labels.numel()
    assert 0.05 < 1 - float(share[0]) < 0.3 and bool((share[1:] > 0.003).all())
    # the background cannot be told by intensity alone: digits are inked both dark and light
    digit = test.images[:, 0][test.labels > 0].float()
    assert float((digit < 64).float().mean()) > 0.1 and float((digit > 192).float().mean()) > 0.1
    with pytest.raises(DfkdError, match="another input size"):
        spec.load("test", size=32)


def test_a_segmentation_network_is_checked_as_one() -> None:
    from dfkd_common.data import get_dataset
    from dfkd_common.models import build_for
    from dfkd_common.models.zoo import InputRejected

    info = get_dataset("mnist5k-seg").info
    model = build_for("deeplab_mini_half", info)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 11, 64, 64)
    with pytest.raises(InputRejected, match=r"not logits of shape \(11, 64, 64\)"):
        build_for("wrn_16_1", info)  # a classifier: one set of logits per image


@pytest.mark.parametrize("arch", ["torchvision:lraspp_mobilenet_v3_large", "torchvision:deeplabv3_mobilenet_v3_large",
                                  "torchvision:fcn_resnet50", "torchvision:deeplabv3_resnet50"])
def test_torchvision_segmentation_models_as_architectures(arch: str, tmp_path) -> None:
    """torchvision's segmentation networks, random weights (no backbone download), per-pixel logits out, and
    their parameter names torchvision's own (a state dict saved from torchvision loads as it is)."""
    import dataclasses

    from dfkd_common.data import get_dataset
    from dfkd_common.models import build_for

    info = dataclasses.replace(get_dataset("mnist5k-seg").info, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = build_for(arch, info).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 11, 64, 64)
    keys = set(model.net.state_dict())
    assert any(k.startswith("backbone.") for k in keys) and not any(k.startswith("aux_classifier") for k in keys)


@pytest.mark.slow
def test_teacher_then_dfad_on_real_canvases_end_to_end(tmp_path, dfkd) -> None:
    """`dfkd teacher train` on mnist5k-seg: the network learns the digits' shapes, far above predicting the
    background everywhere (mIoU 0.079: background's IoU 0.87 over 11 classes, the others 0); then DFAD distils it
    into a student that beats that by a wide margin on the real test canvases."""
    import json

    params = tmp_path / "params.yaml"
    params.write_text("teacher:\n  dataset: mnist5k-seg\n  arch: deeplab_mini_half\n  epochs: 3\n  batch_size: 32\n"
                      "  lr: 0.003\n  optimizer: adam\n  weight_decay: 0.0\n  augment: {crop_pad: 0, flip: false}\n")
    metrics = tmp_path / "t.metrics.json"
    dfkd("teacher", "train", "--params", params, "--out", tmp_path / "t.safetensors", "--metrics", metrics,
         check=True)
    scores = json.loads(metrics.read_text())
    assert scores["miou"] > 0.2 and scores["pixel_acc"] > 0.87  # 3 epochs of the half-width network
    refused = dfkd("teacher", "train", "--params", params, "--set", "augment.flip=true", "--out", tmp_path / "u.st")
    assert refused.returncode == 2 and "flip move the images" in refused.stderr
    details = json.loads((tmp_path / "t.details.json").read_text())
    assert set(details["iou_per_class"]) == {"background", *"0123456789"}
    assert details["iou_per_class"]["background"] > 0.87

    # ... then DFAD as published (per-pixel L1, 5 student steps per generator step, -log(L1 + 1) for the
    # generator) distils it into a student that never sees a real canvas, measured on the real test canvases
    params.write_text(params.read_text() + DFAD_PARAMS)
    out = tmp_path / "dfad.safetensors"
    dfkd("distill", "--name", "dfad", "--online", "dfad", "--params", params, "--teacher", tmp_path / "t.safetensors",
         "--out", out, "--metrics", tmp_path / "dfad.metrics.json", check=True)
    student = json.loads((tmp_path / "dfad.metrics.json").read_text())
    # 0.079: the background everywhere (its IoU 0.87, every digit's 0); measured here 0.139, digits' IoU 0.07
    assert student["miou"] > 0.079 + E2E_MARGIN, student
    digits = [v for k, v in json.loads((tmp_path / "dfad.details.json").read_text())["iou_per_class"].items()
              if k != "background"]
    assert sum(v or 0.0 for v in digits) / len(digits) > 0.03, digits
    bank = tmp_path / "dfad.bank.h5"  # the generator's recorded samples: images and the teacher's masks
    from dfkd_common.bank import load_bank

    recorded = load_bank(bank)
    assert recorded.labels.shape[1:] == (64, 64) and "teacher_logits" not in recorded.extra


#: what the end-to-end test runs: 1,000 DFAD student steps at batch 32 (the study's settings, fewer epochs)
DFAD_PARAMS = """distill:
  common: {}
  dfad:
    student: deeplab_mini_half
    weights: {kd: 0.0, l1: 1.0}
    epochs: 5
    batch_size: 32
    lr: 0.1
    optimizer: sgd
    weight_decay: 0.0005
    augment: {crop_pad: 0, flip: false}
    online: {nz: 256, ngf: 32, lr_g: 0.001, student_steps: 5, iterations: 40, record: 8}
"""
E2E_MARGIN = 0.03


def test_a_segmentation_bank_holds_masks_and_shows_them(tmp_path, dfkd) -> None:
    """A bank of real canvases with their masks: `dfkd bank info` gives each class's share of the pixels,
    `dfkd bank grid` draws each image beside its mask in the classes' colours, with a legend."""
    import json

    from PIL import Image

    from dfkd_common.bank import BankWriter, load_bank
    from dfkd_common.data import get_dataset
    from dfkd_common.inspect import palette

    spec = get_dataset("mnist5k-seg")
    test = spec.load("test")
    path = tmp_path / "seg.h5"
    with BankWriter(path, channels=1, image_size=64, kind="synthetic", method="t",
                    dataset=spec.info.to_dict()) as w:
        w.append(test.images[:12], test.labels[:12], 0)
    bank = load_bank(path)
    assert bank.labels.shape == (12, 64, 64) and torch.equal(bank.labels.to(torch.uint8), test.labels[:12])
    summary = tmp_path / "info.json"
    dfkd("bank", "info", path, "--json", summary, check=True)
    info = json.loads(summary.read_text())
    shares = {row["name"]: row["share"] for row in info["per_class"]}
    assert info["counted"] == "pixels" and sum(shares.values()) == pytest.approx(1.0)
    expected = float((test.labels[:12] == 0).double().mean())
    assert shares["background"] == pytest.approx(expected)
    grid = tmp_path / "grid.png"
    dfkd("bank", "grid", path, "--out", grid, check=True)
    colours = {tuple(c) for c in Image.open(grid).convert("RGB").getdata()}
    present = torch.unique(test.labels[:12]).tolist()
    assert all(tuple(palette(11)[k].tolist()) in colours for k in present)


def _png(path, array) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_camvid_nyuv2_and_voc_folders_load_in_their_layouts(tmp_path) -> None:
    """Small files written in each dataset's usual layout drive the real loaders (VOC: torchvision's
    VOCSegmentation): images resized, masks by nearest neighbour, void pixels 255."""
    from scipy.io import savemat

    from dfkd_common.data import get_dataset

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, 30:] = 3
    mask[:5] = 11  # CamVid's void
    for split in ("train", "test"):
        _png(tmp_path / "CamVid" / split / "a.png", image)
        _png(tmp_path / "CamVid" / f"{split}annot" / "a.png", mask)
    camvid = get_dataset("camvid", image_size=20).load("test", tmp_path)
    assert camvid.images.shape == (1, 3, 20, 20) and camvid.labels.shape == (1, 20, 20)
    assert set(torch.unique(camvid.labels).tolist()) == {0, 3, IGNORE}
    assert int(camvid.labels[0, 10, 5]) == 0 and int(camvid.labels[0, 10, 15]) == 3

    nyu = tmp_path / "NYUv2"
    (nyu / "nyuv2-meta-data").mkdir(parents=True)
    savemat(str(nyu / "nyuv2-meta-data" / "splits.mat"), {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    nyu_mask = np.zeros((40, 60), dtype=np.uint8)  # 0: void
    nyu_mask[10:] = 5  # class 5 of 1-13: index 4
    _png(nyu / "480_640" / "IMAGE" / "1.png", image)
    _png(nyu / "nyuv2-meta-data" / "test_labels_13" / "new_nyu_class13_0002.png", nyu_mask)
    test = get_dataset("nyuv2", image_size=(16, 24)).load("test", tmp_path)
    assert test.images.shape == (1, 3, 16, 24)
    assert set(torch.unique(test.labels).tolist()) == {4, IGNORE}

    voc = tmp_path / "VOC" / "VOCdevkit" / "VOC2012"
    _png(voc / "JPEGImages" / "x.jpg", image)
    voc_mask = np.zeros((40, 60), dtype=np.uint8)
    voc_mask[20:, 20:] = 15
    voc_mask[18:21, :] = 255  # an object border
    _png(voc / "SegmentationClass" / "x.png", voc_mask)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    val = get_dataset("voc", image_size=32).load("test", tmp_path)
    assert val.images.shape == (1, 3, 32, 32) and set(torch.unique(val.labels).tolist()) == {0, 15, IGNORE}

    with pytest.raises(DfkdError, match="CamVid not found"):
        get_dataset("camvid").load("train", tmp_path / "nowhere")


def test_deepinversion_inverts_a_segmentation_teacher_and_others_are_refused(tmp_path, dfkd, one_line_error) -> None:
    """DeepInversion draws no targets for a segmentation teacher: its bank's masks are the teacher's on the
    images made. A method that cannot serve the task is one line naming those that can."""
    from dfkd_common import __version__
    from dfkd_common.bank import load_bank
    from dfkd_common.checkpoint import ModelMeta, load_model, now, save_model
    from dfkd_common.data import get_dataset
    from dfkd_common.models import build_for

    info = get_dataset("mnist5k-seg").info
    torch.manual_seed(0)
    teacher = tmp_path / "t.safetensors"
    save_model(teacher, build_for("deeplab_mini_half", info), ModelMeta("deeplab_mini_half", {}, info, {}, {}, now(),
                                                                         __version__, "teacher"))
    params = tmp_path / "none.yaml"
    params.write_text("{}\n")
    out = tmp_path / "di.h5"
    dfkd("synthesize", "--method", "deepinversion", "--teacher", teacher, "--out", out, "--params", params,
         "--set", "rounds=1", "--set", "batch_size=4", "--set", "g_steps=2", "--set", "amp=false", check=True)
    bank = load_bank(out)
    model, _ = load_model(teacher)
    with torch.no_grad():
        masks = model(bank.images.float() / 255).argmax(1)
    assert bank.labels.shape == (4, 64, 64)
    assert float((bank.labels.long() == masks).float().mean()) > 0.99  # uint8 rounding of the images aside
    assert "teacher_logits" not in bank.extra  # per-pixel logits only on request
    asked = tmp_path / "logits.h5"
    dfkd("synthesize", "--method", "deepinversion", "--teacher", teacher, "--out", asked, "--params", params,
         "--set", "rounds=1", "--set", "batch_size=2", "--set", "g_steps=1", "--set", "amp=false",
         "--set", "teacher_logits=true", check=True)
    stored = load_bank(asked).extra["teacher_logits"]
    agree = (stored.float().argmax(1) == load_bank(asked).labels.long()).float().mean()
    assert stored.shape == (2, 11, 64, 64) and float(agree) > 0.99
    # DAFL (the paper's failing baseline for segmentation): its generator's bank, masks the teacher's as well
    dafl = tmp_path / "dafl.h5"
    dfkd("synthesize", "--method", "dafl", "--teacher", teacher, "--out", dafl, "--params", params,
         "--set", "rounds=1", "--set", "batch_size=4", "--set", "g_steps=2", "--set", "amp=false", check=True)
    bank = load_bank(dafl)
    with torch.no_grad():
        masks = model(bank.images.float() / 255).argmax(1)
    assert bank.labels.shape == (4, 64, 64) and float((bank.labels.long() == masks).float().mean()) > 0.99
    refused = dfkd("synthesize", "--method", "fast", "--teacher", teacher, "--out", tmp_path / "f.h5", "--params",
                   params)
    one_line_error(refused, "fast cannot invert a segmentation teacher", code=2)
    assert "dafl, deepinversion, dfkd distill --online dfad" in refused.stderr
    assert not (tmp_path / "f.h5").exists()
    listed = dfkd("methods", check=True).stdout
    assert "methods for segmentation: dafl, deepinversion, dfad (the others classification only)" in listed


def test_dafl_entropy_balances_the_pixels_classes() -> None:
    """DAFL's ``ie`` over per-pixel logits is the entropy of the class shares over every pixel of the batch:
    lowest (-ln K) when the pixels' classes are balanced, 0 when every pixel is one class, and its gradient moves
    a one-class batch toward balance."""
    from dfkd_common.synthesis.losses import TERMS, Context

    ie = TERMS.get("ie")
    k = 4
    balanced = one_hot_logits(torch.arange(k).repeat_interleave(4).view(1, 4, 4), k)  # each class 4 of 16 pixels
    assert float(ie(Context(x=torch.zeros(1), t_logits=balanced * 10))) == pytest.approx(-math.log(k), abs=1e-4)
    single = one_hot_logits(torch.zeros(2, 4, 4, dtype=torch.long), k)
    assert float(ie(Context(x=torch.zeros(1), t_logits=single * 10))) == pytest.approx(0.0, abs=1e-3)
    leaning = (single / 5).requires_grad_(True)  # every pixel leans to class 0, unsaturated
    value = ie(Context(x=torch.zeros(1), t_logits=leaning))
    value.backward()
    stepped = float(ie(Context(x=torch.zeros(1), t_logits=leaning.detach() - 10 * leaning.grad)))
    assert -math.log(k) <= stepped < float(value) < 0


def test_per_class_iou_names_each_class() -> None:
    task = get_task("segmentation")
    target = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 0, 0, 1], [1, 2, 2, 0]]])
    out = task.breakdown(one_hot_logits(pred, 4), target, ("background", "a", "b", "c"))
    assert out == {"iou_per_class": {"background": 0.6, "a": pytest.approx(1 / 3, abs=1e-4),
                                     "b": pytest.approx(1 / 3, abs=1e-4), "c": None}}
    assert get_task("classification").breakdown(torch.zeros(2, 3), torch.zeros(2), ("a", "b", "c")) == {}


def test_bank_from_dataset_holds_the_real_images_and_targets(tmp_path, dfkd) -> None:
    """`dfkd bank from-dataset`: the reference bank (KD on real data) of either task, kind `real`."""
    from dfkd_common.bank import load_bank
    from dfkd_common.data import get_dataset

    for name, split in (("mnist5k", "test"), ("mnist5k-seg", "test")):
        out = tmp_path / f"{name}.h5"
        dfkd("bank", "from-dataset", "--dataset", name, "--split", split, "--out", out, check=True)
        bank, data = load_bank(out), get_dataset(name).load(split)
        assert bank.attrs["kind"] == "real" and len(bank) == len(data)
        assert torch.equal(torch.as_tensor(bank.images), data.images)
        assert torch.equal(bank.labels.long(), data.labels.long())


def test_dfad_discrepancy_over_per_pixel_logits() -> None:
    """DFAD's L1 over (N, K, H, W) logits: zero on agreement, positive elsewhere; the student's gradient closes the
    gap at every pixel, and the generator's published segmentation loss -log(L1 + 1) falls as L1 grows."""
    from dfkd_common.functional import l1_discrepancy

    torch.manual_seed(0)
    teacher = torch.randn(2, 11, 8, 8)
    assert float(l1_discrepancy(teacher.clone(), teacher)) == 0.0
    student = torch.randn(2, 11, 8, 8, requires_grad=True)
    gap = l1_discrepancy(student, teacher)
    gap.backward()
    assert float(gap) > 0 and bool((student.grad.abs().sum(1) > 0).all())
    assert float(l1_discrepancy(student.detach() - 0.01 * student.grad.sign(), teacher)) < float(gap)
    assert float(-torch.log1p(gap.detach() * 2)) < float(-torch.log1p(gap.detach()))


def test_an_online_segmentation_run_resumes_its_recorded_masks(tmp_path) -> None:
    """A resumed online run rebuilds its rows from the job: a segmentation bank's target column is its masks
    (a resumed DFAD run once failed with a traceback looking for classification's labels)."""
    from dfkd_common.data import get_dataset
    from dfkd_common.engine import Engine
    from dfkd_common.models import build_for
    from dfkd_common.online import build_online_feed, recording

    info = get_dataset("mnist5k-seg").info
    torch.manual_seed(0)
    teacher = build_for("deeplab_mini_half", info).eval()
    with recording(tmp_path / "b.h5", teacher, info, Engine.create("cpu", amp=False), method="dfad") as ctx:
        feed = build_online_feed("dfad", ctx, {"nz": 8, "ngf": 8, "record": 2})
        masks = torch.randint(0, 11, (2, 64, 64), dtype=torch.uint8)
        feed.record(torch.rand(2, 1, 64, 64), masks, 0)
        resumed = build_online_feed("dfad", ctx, {"nz": 8, "ngf": 8, "record": 2})
        resumed.load_state_dict(feed.state_dict())
        assert torch.equal(resumed.labels, masks.long()) and resumed.images.shape == (2, 1, 64, 64)
