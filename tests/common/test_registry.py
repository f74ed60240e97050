"""Registries: the declared index matches what the modules register, every registered component builds, unknown
names fail with the list of known ones, and the console script starts without torch."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dfkd_common.data import DATASETS, DatasetInfo
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.imports import KEYMAPS
from dfkd_common.index import COMMANDS, INDEX
from dfkd_common.models import GENERATORS, MODELS, SOURCES, build_generator, build_model
from dfkd_common.models.hooks import BNStats, Penultimate
from dfkd_common.online import ONLINE
from dfkd_common.registry import Registry
from dfkd_common.student import STUDENT_TERMS
from dfkd_common.synthesis import SYNTHESIZERS, build_synthesizer
from dfkd_common.synthesis.losses import TERMS
from dfkd_common.tasks import TASKS
from dfkd_common.variation.models import VARIATIONS

ROOT = Path(__file__).resolve().parents[2]
ALL = [TASKS, SOURCES, DATASETS, MODELS, GENERATORS, SYNTHESIZERS, TERMS, STUDENT_TERMS, ONLINE, VARIATIONS, KEYMAPS]

ZOO = ["lenet5", "lenet5_half", "resnet18", "resnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg11_bn"]


def test_registries_hold_the_documented_names() -> None:
    assert set(ZOO) <= set(MODELS.names())
    assert {"mnist5k", "digits", "mnist", "cifar10", "cifar100", "svhn", "imagefolder"} <= set(DATASETS.names())
    assert {"deepinversion", "dafl"} <= set(SYNTHESIZERS.names())
    assert {"bn", "oh", "ie", "act", "tv", "l2", "adv"} <= set(TERMS.names())
    assert {"kd", "ce", "l1", "na"} <= set(STUDENT_TERMS.names())
    assert "dcgan" in GENERATORS
    assert {"sdedit-prior", "sd-image-variations"} <= set(VARIATIONS.names())


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.kind)
def test_unknown_name_is_a_clear_error(reg: Registry) -> None:
    with pytest.raises(DfkdError, match=r"unknown .*'nope'.*known: "):
        reg.get("nope")


def test_every_registry_is_in_the_index() -> None:
    assert {reg.kind for reg in ALL} == set(INDEX)


def _import_every_module() -> None:
    """Every module of the package, so a module that registers a name without an index line is found too."""
    import dfkd_common

    for info in pkgutil.walk_packages(dfkd_common.__path__, "dfkd_common."):
        importlib.import_module(info.name)


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.kind)
def test_the_index_names_exactly_what_each_module_registers(reg: Registry) -> None:
    """Lazy loading imports the module the index names for a name: it must be the module that registers it, and no
    module of the package may register a name the index lacks (``dfkd methods`` lists the index, not the modules)."""
    _import_every_module()
    ours = {name for name in reg._items if (reg.origin(name) or "").startswith("dfkd_common.")}  # not tests' own
    unindexed = sorted(ours - set(reg.index))
    assert not unindexed, f"{reg.kind}: registered but not in dfkd_common/index.py: {unindexed}"
    wrong = {name: (reg.origin(name), module) for name, module in reg.index.items() if reg.origin(name) != module}
    assert not wrong, f"{reg.kind}: (registered by, index says) {wrong}"


def test_the_index_says_which_tasks_each_method_serves() -> None:
    """``dfkd methods`` and every refusal name the methods for a task from the index: it must be what each method
    itself accepts (a synthesizer's or an online feed's ``tasks``), classification only where it names none."""
    from dfkd_common.index import TASKS_SERVED, online_methods
    from dfkd_common.online import ONLINE
    from dfkd_common.synthesis import SYNTHESIZERS

    for name in online_methods():
        reg = SYNTHESIZERS if name in SYNTHESIZERS.names() else ONLINE
        assert tuple(reg.get(name).tasks) == TASKS_SERVED.get(name, ("classification",)), name


def test_a_name_imports_its_module_only_when_asked_for(fresh_python: Any) -> None:
    code = ("import sys\n"
            "from dfkd_common.synthesis import SYNTHESIZERS\n"
            "from dfkd_common.student import STUDENT_TERMS\n"
            "assert 'dfkd_common.synthesis.cpnet' not in sys.modules, 'cpnet imported with the registry'\n"
            "assert 'dfkd_common.student.dda' not in sys.modules\n"
            "assert 'cpnet' in SYNTHESIZERS.names() and 'fea' in STUDENT_TERMS.names()\n"
            "SYNTHESIZERS.get('cpnet')\n"
            "assert 'dfkd_common.synthesis.cpnet' in sys.modules\n"
            "assert 'dfkd_common.synthesis.dafl' not in sys.modules\n")
    fresh_python(code, check=True)


def test_every_command_module_has_its_command() -> None:
    for name, (module, attr, help_text) in COMMANDS.items():
        assert hasattr(importlib.import_module(module), attr), name
        assert help_text.endswith("."), name


@pytest.mark.parametrize("group,sub", [("teacher", "import"), ("pool", "build"), ("prior", "train"),
                                       ("bank", "verify")])
def test_a_stage_with_sub_commands_stays_a_group(group: str, sub: str, cli: Any) -> None:
    """`dfkd pool build`: a typer app with a single command must not collapse into that command."""
    out = cli(group, "--help")
    assert out.exit_code == 0 and "Commands" in out.output and sub in out.output, out.output


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["methods"]])
def test_the_console_script_answers_without_importing_torch(argv: list[str], fresh_python: Any) -> None:
    code = ("import sys\n"
            f"sys.argv = ['dfkd', *{argv!r}]\n"
            "from stages.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = fresh_python(code, check=True)
    if argv == ["methods"]:
        assert "tasks: classification" in proc.stdout
        assert "model sources: code, timm, torchscript, torchvision, zoo" in proc.stdout
    if argv == ["--version"]:
        from dfkd_common import __version__

        assert proc.stdout.strip() == f"dfkd {__version__}"


def test_double_registration_is_refused() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError):
        reg.register("a")(2)


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_models_forward_and_expose_features(arch: str) -> None:
    channels = 1 if arch.startswith("lenet") else 3
    model = build_model(arch, 7, channels, (0.5,) * channels, (0.25,) * channels).eval()
    x = torch.rand(2, channels, 32, 32)
    with Penultimate(model) as hook:
        logits = model(x)
    assert logits.shape == (2, 7)
    assert hook.value.shape == (2, model.classifier.in_features)
    assert model.num_classes == 7
    # every zoo model has BatchNorm layers, so the BN-statistics prior applies to all of them
    assert len(BNStats(model)) > 0


def test_lenet5_matches_the_published_layout_without_bn() -> None:
    net = build_model("lenet5", 10, 1, (0.1,), (0.3,), batchnorm=False).net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(120, 84), (84, 10)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_dcgan_generator_shapes_and_range() -> None:
    g = build_generator("dcgan", nz=16, ngf=8, image_size=32, channels=3)
    with torch.no_grad():
        x = g(torch.randn(4, 16))
    assert x.shape == (4, 3, 32, 32)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


@pytest.mark.parametrize("method", sorted(SYNTHESIZERS.names()))
def test_every_synthesizer_rejects_a_misspelt_param(method: str) -> None:
    """A typo in a params.yaml method section must stop the stage, not silently run the method's defaults."""
    info = DatasetInfo("toy", 1, 32, 10, tuple(str(i) for i in range(10)), (0.5,), (0.25,))
    teacher = build_model("lenet5", 10, 1, info.mean, info.std)
    with pytest.raises(DfkdError, match=r"unknown param\(s\) gsteps"):
        build_synthesizer(method, teacher, info, {"gsteps": 5}, Engine.create("cpu"))
