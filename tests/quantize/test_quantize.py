"""dfkd quantize: the fake quantization is ONNX Runtime's, calibration moves the observers, the artifact
round-trips through evaluate and export, bad input is one line, and data-free fine-tuning recovers 4-bit weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_common.data import get_dataset
from dfkd_common.models import Classifier
from dfkd_common.quantize import (
    FakeQuantWeight,
    Quantize,
    calibration,
    fake_quantized,
    quantize_onnx,
    read_quantized_meta,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def noparams(tmp_path: Path) -> Path:
    """An empty params file: the repository's params.yaml never leaks into a run."""
    path = tmp_path / "none.yaml"
    path.write_text("{}\n")
    return path


def tiny() -> Classifier:
    """Conv -> ReLU -> pool -> Linear, distinct weight shapes, no BatchNorm (its weights are the exported ones)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(96, 10))
    return Classifier(net, [0.5], [0.25], 10).eval()


def with_batchnorm() -> Classifier:
    """Conv -> BatchNorm (some gammas negative, odd running statistics) -> ReLU -> Linear: what ONNX Runtime
    stores are the folded weights w * gamma / sigma."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0, 0.9]))
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), bn, nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(96, 10))
    return Classifier(net, [0.5], [0.25], 10).eval()


def dequantized_weights(path: Path) -> dict[tuple[int, ...], np.ndarray]:
    """Every integer initializer of a QDQ model dequantized (by its DequantizeLinear's scale), keyed by shape."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = inits[node.input[0]]
            if q.ndim < 2 or q.dtype.kind == "f":  # int8, uint8, or ml_dtypes' int4 (kind "V")
                continue
            scale = inits[node.input[1]].astype(np.float32)
            out[q.shape] = q.astype(np.float32) * scale.reshape(-1, *([1] * (q.ndim - 1)))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantized_weights_are_onnxruntimes(tmp_path: Path, bits: int) -> None:
    """What the fine-tuning trains through is what ONNX Runtime stores: per channel, to the last bit."""
    model = tiny()
    out = tmp_path / "q.onnx"
    quantize_onnx(model, (1, 8, 8), torch.rand(32, 1, 8, 8), Quantize(weight_bits=bits), out)
    stored = dequantized_weights(out)
    for layer in (model.net[0], model.net[4]):
        faked = FakeQuantWeight(bits)(layer.weight.detach()).numpy()
        np.testing.assert_allclose(stored[tuple(layer.weight.shape)], faked, rtol=1e-6, atol=1e-7)
        assert max(len(np.unique(channel)) for channel in faked) <= 2**bits  # 4 bits: 16 values a channel


@pytest.mark.parametrize("bits", [8, 4])
def test_folded_batchnorm_is_what_onnxruntime_quantizes(tmp_path: Path, bits: int) -> None:
    """The fine-tuning folds each BatchNorm into the convolution feeding it, as the export does, so its fake
    quantization is of the stored weights; the folded model computes what the model did."""
    from dfkd_common.quantize import fold_batchnorm

    model = with_batchnorm()
    x = torch.rand(8, 1, 8, 8)
    out = tmp_path / "q.onnx"
    quantize_onnx(model, (1, 8, 8), x, Quantize(weight_bits=bits), out)
    before = model(x)
    assert fold_batchnorm(model, x[:2]) == 1
    assert isinstance(model.net[1], nn.Identity)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    faked = FakeQuantWeight(bits)(model.net[0].weight.detach()).numpy()
    np.testing.assert_allclose(dequantized_weights(out)[(6, 1, 3, 3)], faked, rtol=1e-6, atol=1e-7)


def test_a_student_with_its_own_input_size_quantizes(tmp_path: Path, mnist_test) -> None:
    """A network that takes another size than its data (resized inside, antialiased: no ONNX form) is quantized
    at its own size, and dfkd resizes images to it before they go in."""
    from dfkd_common.checkpoint import ModelMeta
    from dfkd_common.quantize import OnnxModel, fit, net_shape

    info = mnist_test.info
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    model = Classifier(net, info.mean, info.std, 10, input_size=(16, 16)).eval()
    meta = ModelMeta("x", {}, info, {}, {}, "", "", "student", input_size=[16, 16])
    shape = net_shape(meta)
    assert shape == (1, 16, 16)
    x = mnist_test.images[:64].float() / 255
    out = tmp_path / "q.onnx"
    quantize_onnx(model, shape, fit(x, shape), Quantize(), out)
    agree = (OnnxModel(out, shape)(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree > 0.95


def test_fake_quantization_goes_and_keeps_trained_weights() -> None:
    """Inside the block the weights are quantized with straight-through gradients; after it the float weights
    (trained, not rounded) are back and no hook is left."""
    model = tiny()
    before = model.net[0].weight.detach().clone()
    x = torch.rand(16, 1, 8, 8)
    with fake_quantized(model, 4, x) as fq:
        w = fq.net[0].weight
        assert len(torch.unique(w[0])) <= 16
        fq(x).square().sum().backward()
        grad = fq.net[0].parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0  # straight through the rounding
        with torch.no_grad():
            fq.net[0].parametrizations.weight.original.add_(0.01)
    after = model.net[0].weight.detach()
    assert torch.allclose(after, before + 0.01)
    assert not model.net[0]._forward_pre_hooks and not hasattr(model.net[0], "parametrizations")


def test_calibration_changes_the_observers(tmp_path: Path, small_bank, mnist_train) -> None:
    """A bank of digits and Gaussian noise give other activation scales (the input's quantization first)."""
    info = mnist_train.info
    model = tiny()
    bank = small_bank(tmp_path / "b.h5", n=64)
    scales = {}
    for kind, banks in (("bank", [bank]), ("noise", [])):
        calib = calibration(kind, banks, info, 64, 0)
        out = tmp_path / f"{kind}.onnx"
        quantize_onnx(model, (1, 32, 32), calib.images, Quantize(), out)
        graph = onnx.load(str(out)).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        scales[kind] = [float(inits[n.input[1]]) for n in graph.node
                        if n.op_type == "QuantizeLinear" and inits[n.input[1]].ndim == 0]
    assert len(scales["bank"]) == len(scales["noise"]) > 0
    assert scales["noise"][0] > 2 * scales["bank"][0]  # noise spans ~8 std of the normalised input, the bank ~4


def test_quantize_round_trips_through_evaluate_and_export(tmp_path: Path, dfkd, teacher_ckpt, small_bank,
                                                          noparams: Path) -> None:
    bank = small_bank(tmp_path / "b.h5", n=128)
    out, metrics = tmp_path / "q.onnx", tmp_path / "q.metrics.json"
    dfkd("quantize", "--model", teacher_ckpt, "--bank", bank, "--out", out, "--metrics", metrics,
         "--params", noparams, check=True)
    meta = read_quantized_meta(out)
    quant = meta.params["quantization"]
    assert meta.kind == "quantized" and quant["weight_bits"] == 8 and quant["act_bits"] == 8
    assert quant["calibration_sources"][0]["sha256"] and quant["fp32"]["sha256"]
    written = json.loads(metrics.read_text())
    assert written["test_acc"] == pytest.approx(meta.metrics["test_acc"])
    assert written["x_teacher"] > 0.98  # W8A8 of a LeNet-5: within 2 % of fp32
    again = tmp_path / "e.json"
    dfkd("evaluate", out, "--metrics", again, check=True)
    assert json.loads(again.read_text())["test_acc"] == pytest.approx(written["test_acc"])
    deploy = tmp_path / "deploy.onnx"
    dfkd("export", out, "--out", deploy, check=True)
    session = ort.InferenceSession(str(deploy), providers=["CPUExecutionProvider"])
    test = get_dataset("mnist5k").load("test")
    x28 = get_dataset("mnist5k").native("test", Path.home() / ".cache/dfkd/data")[0][:200].float().div(255).numpy()
    x32 = test.images[:200].float().div(255).numpy()
    own = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"images": x32})[0], own.run(None, {"images": x32})[0])
    agree = (session.run(None, {"images": x28})[0].argmax(1) == test.labels[:200].numpy()).mean()
    assert agree > 0.9  # 28x28 digits resized inside, as the fp32 export does
    assert json.loads(deploy.with_name("deploy.onnx.json").read_text())["input"]["size"] == "any"


def test_bad_input_is_one_line(tmp_path: Path, dfkd, teacher_ckpt, small_bank, one_line_error,
                               noparams: Path) -> None:
    none = noparams
    wrong = small_bank(tmp_path / "wrong.h5", n=16, size=28)
    proc = dfkd("quantize", "--model", teacher_ckpt, "--bank", wrong, "--out", tmp_path / "q.onnx", "--params", none)
    one_line_error(proc, "expects 1x32x32", code=2)
    assert not (tmp_path / "q.onnx").exists()
    one_line_error(dfkd("quantize", "--model", teacher_ckpt, "--bank", wrong, "--out", tmp_path / "q.pt2",
                        "--params", none), "name it *.onnx", code=2)
    one_line_error(dfkd("quantize", "--model", teacher_ckpt, "--out", tmp_path / "q.onnx", "--params", none),
                   "--calibration", code=2)
    one_line_error(dfkd("evaluate", tmp_path / "missing.onnx"), "not found", code=2)
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    one_line_error(dfkd("export", tmp_path / "garbage.onnx", "--out", tmp_path / "d.onnx"), "ONNX", code=2)


@pytest.mark.slow
def test_finetuning_recovers_4_bit_weights(tmp_path: Path, dfkd, teacher_ckpt, mnist_train, noparams: Path) -> None:
    """W4A8 from calibration alone loses accuracy; distilled from its fp32 self on a bank of real digits (no
    labels used) it comes back within a point of fp32 and above calibration alone."""
    from dfkd_common.bank import BankWriter

    bank = tmp_path / "digits.h5"
    with BankWriter(bank, channels=1, image_size=32, kind="retrieved", method="t",
                    dataset=mnist_train.info.to_dict()) as w:
        w.append(mnist_train.images[:2048].float().div(255), torch.full((2048,), -1), 0)
    acc = {}
    for epochs in (0, 4):
        metrics = tmp_path / f"ft{epochs}.metrics.json"
        dfkd("quantize", "--model", teacher_ckpt, "--bank", bank, "--weight-bits", 4, "--finetune-epochs", epochs,
             "--out", tmp_path / f"ft{epochs}.onnx", "--metrics", metrics, "--params", noparams,
             check=True)
        acc[epochs] = json.loads(metrics.read_text())
    assert acc[4]["x_teacher"] >= 0.99
    assert acc[4]["test_acc"] >= acc[0]["test_acc"]


def test_interrupted_finetuning_resumes_to_the_same_model(tmp_path: Path, teacher_ckpt, small_bank,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Fine-tuning stopped in its second epoch and run again gives the model an uninterrupted run gives."""
    import dataclasses

    from dfkd_common.runs import quantize_run

    bank = small_bank(tmp_path / "b.h5", n=128)
    cfg = Quantize(weight_bits=4, calibration_images=64)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=3, batch_size=32))
    real_distill = quantize_run.distill

    def run(out: Path, stop_after: int | None = None) -> None:
        def distill(*args: object, **kwargs: object) -> object:
            def stop(row: dict[str, object]) -> None:
                if stop_after is not None and row["epoch"] == stop_after:
                    raise KeyboardInterrupt

            return real_distill(*args, **kwargs, on_epoch=stop)  # type: ignore[arg-type]

        monkeypatch.setattr(quantize_run, "distill", distill)
        quantize_run.run(cfg, quantize_run.QuantizePaths(teacher_ckpt, out, [bank]), "bank", device="cpu",
                         say=lambda _: None)

    run(tmp_path / "straight.onnx")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed.onnx", stop_after=2)  # the state of epoch 1 is kept
    assert not (tmp_path / "resumed.onnx").exists() and (tmp_path / ".resumed.onnx.state.safetensors").exists()
    with caplog.at_level("INFO", logger="dfkd.runner"):
        run(tmp_path / "resumed.onnx")
    assert "resuming after epoch 1 of 3" in caplog.text  # not a fresh start that happens to agree
    straight, resumed = (dequantized_weights(tmp_path / f"{n}.onnx") for n in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for shape in straight:
        np.testing.assert_array_equal(straight[shape], resumed[shape])
    assert not (tmp_path / ".resumed.onnx.state.safetensors").exists()
