"""Your own network (issue 29): classes defined outside dfkd (tests/fixtures/own_nets) as teacher and student, by
reference and under explicit trust; the teacher's input size governs; features found on networks unlike the zoo's
or named; methods that cannot serve a network say so; TorchScript programs and wrapped state dicts."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.errors import DfkdError
from dfkd_common.models import build_model, user_code
from dfkd_common.models.hooks import Penultimate, stage_outputs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BN_FILE = FIXTURES / "own_nets" / "bn.py"
INFO = get_dataset("mnist5k").info
ENV = {"PYTHONPATH": f"{FIXTURES}:{Path(__file__).resolve().parents[2]}"}


@pytest.fixture(autouse=True)
def own_nets_importable() -> Iterator[None]:
    """The fixture package on sys.path (as a user's own package would be installed), and no trust left over."""
    sys.path.insert(0, str(FIXTURES))
    user_code.untrust_all()
    yield
    user_code.untrust_all()
    sys.path.remove(str(FIXTURES))


# ----------------------------------------------------------------------------------------- references and trust
def test_references_parse_and_registered_sources_are_not_user_code() -> None:
    assert user_code.parse("own_nets.digits:Net28") == user_code.CodeRef("own_nets.digits", "Net28")
    assert user_code.parse("nets/bn.py:BNNet") == user_code.CodeRef("nets/bn.py", "BNNet")
    for ref in ("lenet5", "torchvision:resnet18", "timm:resnet18", "zoo:lenet5", "torchscript:m.pt", "a b:C"):
        assert user_code.parse(ref) is None, ref


def test_user_code_is_imported_only_when_trusted() -> None:
    sys.modules.pop("own_nets.digits", None)
    with pytest.raises(DfkdError, match=r"code outside dfkd: .* --trust-code own_nets.digits "
                                        r"\(pipelines: trust_code: \[own_nets.digits\]"):
        build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std)
    assert "own_nets.digits" not in sys.modules  # nothing of it ran
    user_code.trust("own_nets")  # a package allows its modules
    model = build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std, image_size=28)
    assert type(model.net).__name__ == "Net28"


def test_a_reference_that_is_no_module_class_or_file_is_one_line(tmp_path: Path) -> None:
    user_code.trust("nowhere_module", "own_nets", str(tmp_path / "x.py"))
    with pytest.raises(DfkdError, match=r"cannot import nowhere_module .* install it or put it on PYTHONPATH"):
        build_model("nowhere_module:Net", 10, 1, INFO.mean, INFO.std)
    with pytest.raises(DfkdError, match=r"own_nets\.digits has no Missing"):
        build_model("own_nets.digits:Missing", 10, 1, INFO.mean, INFO.std)
    (tmp_path / "x.py").write_text("def Net():\n    raise SystemExit('called')\n")
    with pytest.raises(DfkdError, match=r"Net is a function, not an nn\.Module subclass"):
        build_model(f"{tmp_path / 'x.py'}:Net", 10, 1, INFO.mean, INFO.std)  # checked before it is called


def test_a_changed_source_file_warns_with_both_fingerprints(tmp_path: Path) -> None:
    from dfkd_common.checkpoint import ModelMeta, now, save_model

    source = tmp_path / "mynet.py"
    shutil.copy(BN_FILE, source)
    user_code.trust("mynet")
    model = build_model(f"{source}:BNNet", 10, 1, INFO.mean, INFO.std, image_size=32)
    save_model(tmp_path / "m.safetensors", model, ModelMeta(f"{source}:BNNet", {}, INFO, {}, {}, now(), "t", "teacher"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, meta = load_model(tmp_path / "m.safetensors")  # unchanged: no warning
    assert meta.code is not None and meta.code["file"] == str(source)
    source.write_text(source.read_text() + "\n# edited\n")
    with pytest.warns(UserWarning, match=rf"code of {source}:BNNet .* changed .* \(sha256 {meta.code['sha256'][:12]} "
                                         r"then, [0-9a-f]{12} now\)"):
        load_model(tmp_path / "m.safetensors")


# ----------------------------------------------------------------------------------------- features and refusals
def test_features_are_found_on_a_functional_head_and_can_be_named() -> None:
    user_code.trust("own_nets")
    student = build_model("own_nets.digits:FunctionalStudent", 10, 1, INFO.mean, INFO.std, image_size=28)
    with Penultimate(student) as hook:
        logits = student(torch.rand(3, 1, 28, 28))
    feat = hook.value
    assert feat.shape == (3, 32)  # the global pool's output, what F.linear reads
    torch.testing.assert_close(F.linear(feat, student.net.weight, student.net.bias), logits)
    teacher = build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std, image_size=28)
    with Penultimate(teacher) as hook:
        teacher.eval()(torch.rand(2, 1, 28, 28))
    assert hook.value.shape == (2, 64)  # the input of the head's last Linear, past its ReLU and Dropout
    named = build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std, image_size=28,
                        features={"penultimate": "body", "stages": ["body.2", "body.5"]})
    with Penultimate(named) as hook:
        named.eval()(torch.rand(2, 1, 28, 28))
    assert hook.value.shape == (2, 16 * 5 * 5)
    assert [(s.path, s.height) for s in stage_outputs(named, 1, 28)] == [("net.body.2", 13), ("net.body.5", 5)]
    with pytest.raises(DfkdError, match=r"has no module 'head\.9'"):
        build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std, features={"penultimate": "head.9"})


def test_methods_that_need_batchnorm_refuse_a_teacher_without_it() -> None:
    from dfkd_common.engine import Engine
    from dfkd_common.synthesis import build_synthesizer

    user_code.trust("own_nets")
    info = INFO.at(28)
    teacher = build_model("own_nets.digits:Net28", 10, 1, INFO.mean, INFO.std, image_size=28)
    engine = Engine.create("cpu", amp=False)
    for method in ("deepinversion", "nayer", "fast", "cpnet", "csd"):
        with pytest.raises(DfkdError, match=r"BatchNorm.* methods that need none: dafl .* dfad .* dfnd"):
            build_synthesizer(method, teacher, info, {"batch_size": 4}, engine)
    build_synthesizer("dafl", teacher, info, {"batch_size": 4}, engine)  # DAFL needs none


# ----------------------------------------------------------------------------------------- the whole path
@pytest.fixture(scope="module")
def own_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Net28 trained with plain PyTorch on mnist5k's own 28x28 training digits, saved as a user would: a .pth
    state dict from a DataParallel-wrapped, compiled model (``module._orig_mod.`` on every key)."""
    sys.path.insert(0, str(FIXTURES))
    from own_nets.digits import Net28

    train = get_dataset("mnist5k").load("train", size=28)
    torch.manual_seed(0)
    net = Net28()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = (train.images.float() / 255 - INFO.mean[0]) / INFO.std[0]
    for _ in range(4):
        for idx in torch.randperm(len(train)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), train.labels[idx]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("own") / "net28.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}}, path)
    sys.path.remove(str(FIXTURES))
    return path


@pytest.mark.slow
def test_a_28_px_teacher_of_your_own_class_through_every_bn_free_method(tmp_path: Path, own_teacher: Path, dfkd: Any,
                                                                        one_line_error: Any, mnist_test: Any) -> None:
    """Imported (mnist5k's 32 px refused, 28 px taken and recorded), distilled by DAFL, DFAD and DFND into a
    student of another own class, evaluated on a test folder, exported to ONNX."""
    teacher = tmp_path / "t.safetensors"
    run = dfkd("teacher", "import", "--arch", "own_nets.digits:Net28", "--weights", own_teacher, "--dataset",
               "mnist5k", "--out", teacher, env=ENV, check=True)
    assert "own_nets.digits:Net28: input 1x28x28, 10 classes, 0 BatchNorm2d layer(s)" in run.stdout.replace("\n", " ")
    meta = json.loads(json.dumps(load_model_meta(teacher)))
    assert meta["image_size"] == [28, 28] and meta["code"]["ref"] == "own_nets.digits:Net28"
    # a later stage imports the code only when told to
    one_line_error(dfkd("synthesize", "-m", "dafl", "--teacher", teacher, "--out", tmp_path / "b.h5", env=ENV),
                   "--trust-code own_nets.digits", code=2)
    trust = ["--trust-code", "own_nets", "--params", tmp_path / "none.yaml"]
    (tmp_path / "none.yaml").write_text("{}\n")
    student = ["--student", "own_nets.digits:FunctionalStudent"]
    dfkd("synthesize", "-m", "dafl", "--teacher", teacher, "--out", tmp_path / "dafl.h5", "--rounds", "6",
         "--set", "batch_size=64", "--set", "g_steps=1", "--set", "ngf=16", *trust, env=ENV, check=True)
    dfkd("distill", "--teacher", teacher, "--bank", tmp_path / "dafl.h5", *student, "--epochs", "2",
         "--out", tmp_path / "s_dafl.safetensors", "--metrics", tmp_path / "dafl.json", *trust, env=ENV, check=True)
    dfkd("distill", "--teacher", teacher, "--online", "dfad", *student, "--epochs", "2", "--set",
         "online.iterations=10", "--out", tmp_path / "s_dfad.safetensors", "--metrics", tmp_path / "dfad.json",
         *trust, env=ENV, check=True)
    # a test folder of MNIST's own 28x28 test digits as PNGs, one in 20
    folder = tmp_path / "folder"
    digits28 = get_dataset("mnist5k").load("test", size=28)
    for i in range(0, 1000, 20):
        label = str(int(digits28.labels[i]))
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits28.images[i, 0].numpy(), mode="L").save(folder / label / f"{i}.png")
    # DFND's pool: mnist5k's training digits, unlabeled (what the pool is does not matter to the plumbing; that it
    # holds relevant images lets the student's accuracy show the teacher's knowledge reached it)
    dfkd("retrieve", "--teacher", teacher, "--wild", "dataset:mnist5k:train", "-n", "2000", "--out",
         tmp_path / "dfnd.h5", *trust, env=ENV, check=True)
    dfkd("distill", "--teacher", teacher, "--bank", tmp_path / "dfnd.h5", *student, "--epochs", "10",
         "--set", "batch_size=32", "--out", tmp_path / "s_dfnd.safetensors", "--metrics", tmp_path / "dfnd.json",
         "--test", folder, *trust, env=ENV, check=True)
    for name in ("dafl", "dfad"):
        details = json.loads((tmp_path / f"{name}.details.json").read_text())
        assert details["evaluated_on"] == "mnist5k test split" and 0 <= details["test_acc"] <= 1
    dfnd = json.loads((tmp_path / "dfnd.details.json").read_text())
    assert dfnd["evaluated_on"] == f"test set {folder}" and dfnd["teacher_acc"] > 0.9
    assert dfnd["test_acc"] > 0.6  # chance is 0.10 on these real held-out digits
    out = dfkd("evaluate", tmp_path / "s_dfnd.safetensors", "--trust-code", "own_nets", env=ENV, check=True)
    assert "on mnist5k/test (1000 images)" in out.stdout
    dfkd("export", tmp_path / "s_dfnd.safetensors", "--out", tmp_path / "s.onnx", "--trust-code", "own_nets",
         env=ENV, check=True)
    import onnxruntime as ort

    x = digits28.images.float().numpy() / 255
    logits = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"images": x})[0]
    assert (np.argmax(logits, 1) == digits28.labels.numpy()).mean() > 0.6


def load_model_meta(path: Path) -> dict[str, Any]:
    from dfkd_common.checkpoint import read_meta

    meta = read_meta(path)
    return {"image_size": list(meta.dataset.image_size), "code": meta.code}


@pytest.mark.slow
def test_a_batchnorm_teacher_of_your_own_class_by_file_path(tmp_path: Path, dfkd: Any) -> None:
    """Trained by dfkd from a file reference, then distilled from a DeepInversion bank and online by NAYER and
    CPNet (the coupled generator mirrors its three BN stages)."""
    source = tmp_path / "bn.py"
    shutil.copy(BN_FILE, source)
    teacher = tmp_path / "t.safetensors"
    none = tmp_path / "none.yaml"
    none.write_text("{}\n")
    run = dfkd("teacher", "train", "--arch", f"{source}:BNNet", "--epochs", "2", "--out", teacher, "--params",
               none, "--metrics", tmp_path / "t.json", cwd=tmp_path, check=True)
    assert "3 BatchNorm2d layer(s)" in run.stdout.replace("\n", " ")
    trust = ["--trust-code", "bn", "--params", none]
    dfkd("synthesize", "-m", "deepinversion", "--teacher", teacher, "--out", tmp_path / "di.h5", "--rounds", "1",
         "--set", "batch_size=32", "--set", "g_steps=10", *trust, cwd=tmp_path, check=True)
    dfkd("distill", "--teacher", teacher, "--bank", tmp_path / "di.h5", "--epochs", "1", "--student", "lenet5_half",
         "--set", "batch_size=16", "--out", tmp_path / "di.safetensors", "--metrics", tmp_path / "di.json", *trust,
         cwd=tmp_path, check=True)
    assert 0 <= json.loads((tmp_path / "di.json").read_text())["test_acc"] <= 1
    for method in ("nayer", "cpnet"):
        dfkd("distill", "--teacher", teacher, "--online", method, "--epochs", "1", "--student", "lenet5_half",
             "--out", tmp_path / f"{method}.safetensors", "--metrics", tmp_path / f"{method}.json", *trust,
             "--set", "online.g_loops=1", "--set", "online.batch_size=32", "--set", "online.g_steps=2",
             cwd=tmp_path, check=True)
        assert 0 <= json.loads((tmp_path / f"{method}.json").read_text())["test_acc"] <= 1


# ----------------------------------------------------------------------------------------- TorchScript, wrappers
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_teacher_under_trust_serves_the_logit_methods(tmp_path: Path, own_teacher: Path, dfkd: Any,
                                                                    one_line_error: Any) -> None:
    from own_nets.digits import Net28

    net = Net28()
    state = torch.load(own_teacher, weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("module._orig_mod."): v for k, v in state.items()})
    program = tmp_path / "net28.pt"
    torch.jit.script(net.eval()).save(str(program))
    out = tmp_path / "t.safetensors"
    refused = dfkd("teacher", "import", "--arch", "own_nets.digits:Net28", "--weights", program, "--dataset",
                   "mnist5k", "--out", out, env=ENV)
    one_line_error(refused, f"{program} is a TorchScript program, not a weights file: import it with --arch "
                            f"torchscript:{program}")
    dfkd("teacher", "import", "--arch", f"torchscript:{program}", "--dataset", "mnist5k", "--out", out, env=ENV,
         check=True)
    one_line_error(dfkd("evaluate", out, env=ENV), "--trust-code net28", code=2)
    assert "on mnist5k/test" in dfkd("evaluate", out, "--trust-code", "net28", env=ENV, check=True).stdout
    one_line_error(dfkd("synthesize", "-m", "dafl", "--teacher", out, "--out", tmp_path / "b.h5", "--trust-code",
                        "net28", env=ENV), "TorchScript program: hooks cannot reach its layers")
    dfkd("retrieve", "--teacher", out, "--wild", "dataset:digits:train", "-n", "50", "--out", tmp_path / "r.h5",
         "--trust-code", "net28", env=ENV, check=True)


def test_a_timm_model_imports_from_a_state_dict_and_is_rebuilt(tmp_path: Path, dfkd: Any) -> None:
    """timm:NAME, random weights filled from the user's file (no hub), rebuilt from the checkpoint alone."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "r10.pth")
    out = tmp_path / "t.safetensors"
    dfkd("teacher", "import", "--arch", "timm:resnet10t", "--weights", tmp_path / "r10.pth", "--dataset",
         "mnist5k", "--out", out, cwd=tmp_path, check=True)
    model, meta = load_model(out)
    assert meta.arch == "timm:resnet10t" and meta.code is None  # a library model: no code of the user's
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()((x - INFO.mean[0]) / INFO.std[0]))


def test_a_student_with_its_own_input_size(tmp_path: Path, teacher_ckpt: Path, small_bank: Any, cli: Any) -> None:
    """The teacher's 32x32 images resized to the student's 16x16 inside the student: trained, saved, rebuilt,
    exported at its own size."""
    bank = small_bank(tmp_path / "b.h5", n=64)
    out = tmp_path / "s.safetensors"
    r = cli("distill", "--teacher", teacher_ckpt, "--bank", bank, "--out", out, "--epochs", "1", "--student",
            "own_nets.digits:FunctionalStudent", "--set", "student_image_size=16", "--params", tmp_path / "p.yaml",
            "--metrics", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    user_code.trust("own_nets")
    model, meta = load_model(out)
    assert meta.input_size == [16, 16] and meta.dataset.image_size == (32, 32)
    seen = []
    model.net.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    model(torch.rand(2, 1, 32, 32))
    assert seen == [(16, 16)]
    from dfkd_common.deploy import export

    done = export(model, meta, out, "torchscript", tmp_path / "s.pt")
    assert done.input["trained_size"] == [16, 16]
