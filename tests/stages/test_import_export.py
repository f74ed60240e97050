"""Your teacher in, your student out: `dfkd teacher import` (safe pickles, authors' key maps, torchvision models),
distillation with a test set of your own or none, and `dfkd export` checked against the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from authors import AUTHORS, authors_state
from torch import nn

from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine, details_path
from dfkd_common.errors import DfkdError
from dfkd_common.imports import KEYMAPS, fold_conv_bias_into_bn, load_weights, read_weights
from dfkd_common.models import build_model
from dfkd_common.models.generators import DCGenerator
from dfkd_common.synthesis import build_synthesizer

ROOT = Path(__file__).resolve().parents[2]
INFO = get_dataset("mnist5k").info


# --------------------------------------------------------------------------------------------- round trip
def test_a_plain_state_dict_of_a_trained_teacher_imports_with_identical_logits(teacher_ckpt: Path,
                                                                              tmp_path: Path, dfkd: Any) -> None:
    teacher, meta = load_model(teacher_ckpt)
    torch.save({"state_dict": teacher.net.state_dict(), "epoch": 6, "best_acc1": 0.97}, tmp_path / "t.pth")
    out = tmp_path / "imported.safetensors"
    proc = dfkd("teacher", "import", "--arch", "lenet5", "--weights", tmp_path / "t.pth", "--dataset", "mnist5k",
               "--out", out, "--metrics", tmp_path / "m.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    imported, imeta = load_model(out)
    x = torch.rand(8, 1, 32, 32)
    assert torch.equal(imported(x), teacher(x))
    assert imeta.headline == pytest.approx(meta.headline)  # the same accuracy on the same test split
    assert json.loads(details_path(tmp_path / "m.json").read_text())["test_acc"] == pytest.approx(meta.headline)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path, dfkd: Any,
                                                                  one_line_error: Any) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pth")
    proc = dfkd("teacher", "import", "--arch", "lenet5", "--weights", tmp_path / "evil.pth", "--dataset", "mnist5k",
               "--out", tmp_path / "t.safetensors", cwd=tmp_path)
    one_line_error(proc, "torch.load(weights_only=True), which refused it", code=2)
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()


def test_each_mismatch_is_one_line_naming_the_first_offending_key(teacher_ckpt: Path, tmp_path: Path, dfkd: Any,
                                                                  one_line_error: Any) -> None:
    state = load_model(teacher_ckpt)[0].net.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "fc.bias"}, "missing key fc.bias"),
        "unexpected": ({**state, "extra.weight": torch.zeros(2)}, "unexpected key extra.weight"),
        "shape": ({**state, "fc1.0.weight": torch.zeros(84, 100)}, "fc1.0.weight has shape (84, 100)"),
        "classes": ({**state, "fc.weight": torch.zeros(100, 84), "fc.bias": torch.zeros(100)},
                    "a different class count"),
    }
    for name, (bad, pattern) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        proc = dfkd("teacher", "import", "--arch", "lenet5", "--weights", tmp_path / f"{name}.pth", "--dataset",
                   "mnist5k", "--out", tmp_path / f"{name}.safetensors", cwd=tmp_path)
        one_line_error(proc, pattern, code=2)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    one_line_error(dfkd("teacher", "import", "--arch", "lenet5", "--weights", tmp_path / "junk.pth", "--dataset",
                        "mnist5k", "--out", tmp_path / "j.safetensors", cwd=tmp_path),
                   "not a readable PyTorch weights file", code=2)


# --------------------------------------------------------------------------------------------- key maps
@pytest.mark.parametrize(("family", "arch"), [(f, a) for f in ("cmi", "dfad") for a in AUTHORS[f]])
def test_the_authors_key_names_map_exactly_onto_the_zoo(family: str, arch: str) -> None:
    """Every key of the authors' network lands on exactly one of ours with its shape, none left over."""
    keymap = KEYMAPS.get(family)
    c = 1 if arch.startswith("lenet") else 3
    model = build_model(arch, 10, c, (0.0,) * c, (1.0,) * c, **keymap.arch_kwargs.get(arch, {}))
    converted = keymap.convert(arch, authors_state(family, arch))
    load_weights(model.net, converted, f"{family}/{arch}")
    for key, value in converted.items():
        assert torch.equal(model.net.state_dict()[key], value), key
    # nothing dropped but the conv biases folded into BN (their VGG's eight convolutions have one each)
    authors = AUTHORS[family][arch]
    conv_biases = [k for k in authors if k.endswith(".bias") and len(authors[k[:-5] + ".weight"]) == 4]
    assert len(authors) - len(converted) == (len(conv_biases) if arch == "vgg11_bn" else 0)


def test_folding_a_conv_bias_into_the_next_bn_is_exact() -> None:
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)).eval()
    theirs[1].running_mean.normal_()
    theirs[1].running_var.uniform_(0.5, 2)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).eval()
    ours.load_state_dict(fold_conv_bias_into_bn(dict(theirs.state_dict())))
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_a_cmi_import_takes_the_authors_normalisation(tmp_path: Path, dfkd: Any) -> None:
    torch.save({"state_dict": authors_state("cmi", "wrn_16_1")}, tmp_path / "cifar10_wrn16_1.pth")
    proc = dfkd("teacher", "import", "--arch", "wrn_16_1", "--weights", tmp_path / "cifar10_wrn16_1.pth",
               "--dataset", "cifar10", "--keys", "cmi", "--out", tmp_path / "t.safetensors", "--set",
               f"data_root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy unmeasured" in proc.stdout  # CIFAR-10 cannot be downloaded here: recorded, not an error
    _, meta = load_model(tmp_path / "t.safetensors")
    assert meta.dataset.std == (0.2023, 0.1994, 0.2010) and meta.headline is None
    assert meta.params["keys"] == "cmi" and len(meta.params["weights_sha256"]) == 64


def test_read_weights_unpacks_nested_and_data_parallel_checkpoints(tmp_path: Path) -> None:
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    torch.save({"model": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}, tmp_path / "c.pt")
    assert read_weights(tmp_path / "c.pt").keys() == state.keys()
    with pytest.raises(DfkdError, match="holds no state dict"):
        torch.save({"epoch": 3}, tmp_path / "d.pt")
        read_weights(tmp_path / "d.pt")


# ------------------------------------------------------------------------------------------ torchvision
def test_a_torchvision_resnet18_imports_at_224_and_runs_deepinversion(tmp_path: Path, dfkd: Any) -> None:
    import torchvision

    from dfkd_common import tvguard  # noqa: F401

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    proc = dfkd("teacher", "import", "--arch", "torchvision:resnet18", "--weights", tmp_path / "r18.pth",
               "--out", tmp_path / "t.safetensors", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    teacher, meta = load_model(tmp_path / "t.safetensors")
    assert (meta.dataset.image_size, meta.dataset.num_classes) == ((224, 224), 1000)
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(meta.dataset.mean).view(1, 3, 1, 1), torch.tensor(meta.dataset.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(x), reference((x - mean) / std), atol=1e-5)
    synth = build_synthesizer("deepinversion", teacher, meta.dataset,
                              {"batch_size": 2, "g_steps": 2, "augment": {"crop_pad": 16}},
                              Engine.create("cpu", amp=False, channels_last=False))
    result = synth.synthesize(0)
    assert result.images.shape == (2, 3, 224, 224) and torch.isfinite(result.images).all()
    # a generator method too: the DCGAN generator upsamples 3 times from 28 x 28 at 224 px
    dafl = build_synthesizer("dafl", teacher, meta.dataset, {"batch_size": 2, "g_steps": 1},
                             Engine.create("cpu", amp=False, channels_last=False))
    assert dafl.synthesize(0).images.shape == (2, 3, 224, 224)
    with pytest.raises(DfkdError, match="multiples of 8"):  # and says what it cannot make
        DCGenerator(image_size=228, channels=3)


# ----------------------------------------------------------------------------------- distill: test sets
@pytest.fixture
def custom_teacher(teacher_ckpt: Path, tmp_path: Path, dfkd: Any) -> Path:
    """The session's teacher imported as if for data nobody has here (no registered dataset)."""
    torch.save(load_model(teacher_ckpt)[0].net.state_dict(), tmp_path / "t.pth")
    out = tmp_path / "custom.safetensors"
    proc = dfkd("teacher", "import", "--arch", "lenet5", "--weights", tmp_path / "t.pth", "--image-size", 32,
               "--channels", 1, "--classes", 10, "--mean", "0.1307", "--std", "0.3081", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return out


def _bank_of_real_digits(path: Path, mnist_train, n: int = 400) -> Path:
    with BankWriter(path, channels=1, image_size=32, kind="retrieved", method="test",
                    dataset=INFO.to_dict()) as w:
        w.append(mnist_train.images[::10][:n], mnist_train.labels[::10][:n], 0)
    return path


@pytest.mark.slow
def test_distillation_with_a_folder_test_set_and_with_none(custom_teacher: Path, tmp_path: Path, mnist_train,
                                                           mnist_test, cli: Any) -> None:
    from PIL import Image

    teacher = custom_teacher
    bank = _bank_of_real_digits(tmp_path / "bank.h5", mnist_train)
    folder = tmp_path / "test"
    for i in range(0, 1000, 4):
        d = folder / str(int(mnist_test.labels[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mnist_test.images[i, 0].numpy()).save(d / f"{i}.png")
    common = ["distill", "--teacher", str(teacher), "--bank", str(bank), "--epochs", "6", "--params",
              str(tmp_path / "p.yaml"), "--set", "batch_size=64"]
    (tmp_path / "p.yaml").write_text("{}\n")
    r = cli(*common, "--out", tmp_path / "a.safetensors", "--test", folder, "--metrics", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    a = json.loads(details_path(tmp_path / "a.json").read_text())
    assert a["evaluated_on"] == f"test set {folder}" and a["test_acc"] > 0.5  # 250 real digits; chance 0.1
    r = cli(*common, "--out", tmp_path / "b.safetensors", "--metrics", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    b = json.loads(details_path(tmp_path / "b.json").read_text())
    assert b["evaluated_on"].startswith("agreement with the teacher on 40 bank images held out")
    assert b["test_acc"] > 0.5


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "state_dict"])
def test_exports_match_the_model_and_carry_the_normalisation(fmt: str, teacher_ckpt: Path, tmp_path: Path,
                                                             dfkd: Any) -> None:
    out = tmp_path / f"model.{fmt}"
    proc = dfkd("export", teacher_ckpt, "--format", fmt, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    model, _ = load_model(teacher_ckpt)
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
    if fmt == "onnx":
        import onnxruntime as ort

        got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        side = json.loads(out.with_name(out.name + ".json").read_text())
        net = build_model(side["arch"], side["num_classes"], 1, side["mean"], side["std"], **side["arch_kwargs"])
        net.net.load_state_dict(torch.load(out, weights_only=True))
        got = net.eval()(x)
    assert torch.allclose(got, expected, atol=1e-4)  # raw [0, 1] images in: the normalisation is inside
