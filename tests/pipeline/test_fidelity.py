"""Fidelity to the published methods (issue 15): each test fails on the behaviour it replaced."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import Engine, details_path, headline_keys, write_metrics
from dfkd_common.loops.distillation import BankFeed, Distillation, distill
from dfkd_common.models import build_model
from dfkd_common.models.coupled import CoupledGenerator, teacher_stages
from dfkd_common.report import markdown_table
from dfkd_common.student import StudentSide, TermSetup
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.deepinversion import DeepInversion
from dfkd_common.synthesis.losses import Context, entropy_balance_term

ROOT = Path(__file__).resolve().parents[2]
ENGINE = Engine.create("cpu", amp=False, channels_last=False)


def _info(channels: int = 1, size: int = 32, k: int = 10) -> DatasetInfo:
    return DatasetInfo("toy", channels, size, k, tuple(f"c{i}" for i in range(k)), (0.5,) * channels,
                       (0.25,) * channels)


def _teacher(info: DatasetInfo) -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5", info.num_classes, info.channels, info.mean, info.std).eval()


# ------------------------------------------------------------------------------------ 1. DeepInversion
def test_deepinversion_projects_its_variable_back_into_range_after_every_step(monkeypatch) -> None:
    """A clamp inside the forward alone leaves the variable outside [0, 1] (and its pixels frozen there)."""
    info = _info()
    seen: list[torch.Tensor] = []
    original = DeepInversion.optimise

    def spy(self: Any, steps: int, step: Any, opt: torch.optim.Optimizer, **kw: Any) -> Any:
        after = kw.get("after_step")

        def record() -> None:
            if after is not None:
                after()
            seen.append(opt.param_groups[0]["params"][0].detach().clone())

        return original(self, steps, step, opt, after_backward=kw.get("after_backward"), after_step=record)

    monkeypatch.setattr(DeepInversion, "optimise", spy)
    synth = build_synthesizer("deepinversion", _teacher(info), info,
                              {"batch_size": 16, "g_steps": 3, "lr": 5.0}, ENGINE, 0)
    result = synth.synthesize(0)
    assert len(seen) == 3
    for v in seen:
        x = v * 0.25 + 0.5  # the teacher's normalisation
        assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
        assert float((x == 0).float().mean() + (x == 1).float().mean()) > 0.05  # lr 5 pushed many to the edges
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1


# ------------------------------------------------------------------------------------ 2. noisy layer
def test_noisy_layer_is_redrawn_at_unit_scale_with_the_published_output_size() -> None:
    info = _info()
    cfg = {"batch_size": 20, "g_steps": 1, "noisy_dim": 64, "embedding": {"source": "random", "dim": 32}}
    synth = build_synthesizer("nayer", _teacher(info), info, cfg, ENGINE, 0)
    inputs = synth.generator.inputs
    layer = inputs.noisy[0]
    assert layer.out_features == 64
    inputs.reinit_noise()
    assert 0.9 < float(layer.weight.std()) < 1.1  # PyTorch's default init: ~1/sqrt(3 * 32) = 0.10
    assert float(layer.bias.abs().max()) == 0.0
    before = layer.weight.clone()
    inputs.reinit_noise()
    assert not torch.equal(before, layer.weight)
    default = build_synthesizer("nayer", _teacher(info), info, {**cfg, "noisy_dim": None}, ENGINE, 0)
    assert default.generator.inputs.noisy[0].out_features == 32  # None: the embedding's size
    published = build_synthesizer("nayer", _teacher(info), info, {k: v for k, v in cfg.items() if k != "noisy_dim"},
                                  ENGINE, 0)
    assert published.generator.inputs.noisy[0].out_features == 1000


# ------------------------------------------------------------------------------------ 3. warm-up schedule
class _WarmFeed(BankFeed):
    """A bank that claims two warm-up epochs, as an online feed with ``warmup: 2``."""

    @property
    def warmup_epochs(self) -> int:
        return 2


@pytest.mark.parametrize("mode", ["skip", "train"])
def test_published_schedule_takes_no_student_step_during_warmup(mode: str, mnist_test) -> None:
    torch.manual_seed(0)
    teacher = build_model("lenet5", 10, 1, mnist_test.info.mean, mnist_test.info.std).eval()
    student = build_model("lenet5_half", 10, 1, mnist_test.info.mean, mnist_test.info.std)
    side = StudentSide(student, {"kd": 1.0}, {}, TermSetup(teacher, student, 1, 32, 0.9))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = Distillation(epochs=4, batch_size=32, kd_steps=2, lr=0.1, eta_min=0.01, student_warmup=mode,
                        augment=AugmentConfig(crop_pad=0))
    lrs: list[float] = []
    feed = _WarmFeed(mnist_test.images[:64], mnist_test.labels[:64], torch.device("cpu"))
    _, history = distill(teacher, side, feed, mnist_test, cfg, ENGINE,
                         on_epoch=lambda row: lrs.append(row["epoch"]))
    steps = [h["student_steps"] for h in history]
    if mode == "skip":
        assert steps == [0, 0, 2, 2]
        assert history[1]["test_acc"] == history[0]["test_acc"]  # nothing moved during warm-up
    else:
        assert steps == [2, 2, 2, 2]
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())


def test_published_cosine_starts_after_warmup_and_ends_at_eta_min(mnist_test) -> None:
    """Cosine over epochs - warmup: the first trained epoch runs at the base lr, the last one's step ends at
    eta_min (the cosine's end is reached exactly when training ends)."""
    torch.manual_seed(0)
    teacher = build_model("lenet5", 10, 1, mnist_test.info.mean, mnist_test.info.std).eval()
    student = build_model("lenet5_half", 10, 1, mnist_test.info.mean, mnist_test.info.std)
    side = StudentSide(student, {"kd": 1.0}, {}, TermSetup(teacher, student, 1, 32, 0.9))
    cfg = Distillation(epochs=5, batch_size=32, kd_steps=1, lr=0.1, eta_min=0.01, student_warmup="skip",
                        augment=AugmentConfig(crop_pad=0))
    seen: list[float] = []
    real_step = torch.optim.SGD.step

    def spy(self: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    torch.optim.SGD.step = spy  # type: ignore[method-assign]
    try:
        distill(teacher, side, _WarmFeed(mnist_test.images[:32], mnist_test.labels[:32], torch.device("cpu")),
                mnist_test, cfg, ENGINE)
    finally:
        torch.optim.SGD.step = real_step  # type: ignore[method-assign]
    assert len(seen) == 3  # epochs 3, 4, 5
    assert seen[0] == pytest.approx(0.1)
    assert seen[-1] == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 2 / 3)) / 2)


# ------------------------------------------------------------------------------------ 4 + 8. Fast
def test_fast_reset_l0_redraws_the_first_layer_before_that_round() -> None:
    info = _info()
    synth = build_synthesizer("fast", _teacher(info), info,
                              {"batch_size": 8, "g_steps": 1, "nz": 16, "ngf": 8, "reset_l0": 2}, ENGINE, 0)
    first = synth.generator.l1
    first.bias.data.fill_(3.0)
    synth.synthesize(0)
    assert float(first.bias.abs().min()) > 0  # round 1: untouched
    synth.synthesize(1)  # round 2: reset first, then one meta step
    assert float(first.bias.abs().max()) < 0.1
    assert 0.01 < float(first.weight.std()) < 0.05


PUBLISHED: dict[str, dict[str, Any]] = {
    # pipelines/<study>/params.yaml distill.<method> (online: ...) against the published scripts
    "cifar10-r34-r18": {
        "common": {"batch_size": 512, "lr": 0.2, "kd_steps": 400, "terms.kd.tau": 20.0, "student_warmup": "skip",
                   "eta_min": 0.0002},
        "fast": {"epochs": 220, "batch_size": 256, "online.g_steps": 10, "online.lr_g": 0.002,
                 "online.lr_z": 0.01, "online.warmup": 20, "online.reset_l0": 140, "online.weights.adv": 1.33,
                 "online.weights.oh": 0.5, "online.weights.bn": 10.0, "online.bn_momentum": 0.9},
        "nayer": {"online.g_steps": 30, "online.batch_size": 400, "online.g_loops": 2, "online.warmup": 20,
                  "online.warmup_loops": 10, "online.lr_g": 0.004, "online.g_life": 10,
                  "online.weights.adv": 1.33, "online.weights.oh": 0.5, "online.weights.bn": 10.0},
        "cpnet": {"online.g_steps": 30, "online.batch_size": 400, "online.cutmix": 0.5,
                  "online.augment.jitter": 0.1, "online.augment.hue": 0.1, "online.augment.jitter_p": 0.4,
                  "online.weights.xn": 1.0, "online.weights.adv": 1.33},
    },
    "cifar10-wrn40_2-wrn16_1": {
        "common": {"epochs": 200, "batch_size": 128, "lr": 0.1, "terms.kd.tau": 20.0, "online.lr_g": 0.001,
                   "online.g_loops": 1, "online.batch_size": 256, "online.g_steps": 400},
        "rgal": {"weights.striplet": 0.1, "weights.cd": 0.1, "online.weights.triplet": 0.1},
        "dda": {"weights.kd": 1.0, "weights.ce": 1.0, "weights.fea": 30.0, "kd_steps": 2000,
                "online.batch_size": 400, "online.g_steps": 200, "online.weights.dda": 10.0,
                "online.weights.adv": 0.0, "online.weights.bn": 1.0, "online.weights.oh": 1.0},
    },
    "cifar100-wrn40_2-wrn16_2": {
        "common": {"student_warmup": "skip", "eta_min": 0.0002, "terms.kd.tau": 20.0},
        "fast": {"epochs": 220, "online.weights.adv": 1.1, "online.weights.oh": 0.4, "online.reset_l0": 140,
                 "online.g_steps": 10, "online.lr_g": 0.002},
        "nayer": {"online.g_steps": 40},
        "cpnet": {"online.g_steps": 40, "online.augment.jitter": 0.1, "online.augment.hue": 0.1,
                  "online.augment.jitter_p": 0.4},
    },
}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("study", sorted(PUBLISHED))
def test_cifar_studies_carry_the_published_recipes(study: str) -> None:
    params = yaml.safe_load((ROOT / "pipelines" / study / "params.yaml").read_text())["distill"]
    for method, table in PUBLISHED[study].items():
        for key, want in table.items():
            assert _get(params[method], key) == want, f"{study} {method}.{key}"


def test_the_dda_study_builds_the_published_initial_bank_and_sd_variations() -> None:
    params = yaml.safe_load((ROOT / "pipelines" / "cifar10-wrn40_2-wrn16_1" / "params.yaml").read_text())
    init = params["synthesize"]["csd"]
    assert (init["rounds"], init["batch_size"], init["g_steps"], init["lr_g"]) == (400, 200, 500, 0.001)
    assert init["weights"]["dda"] == 0.0 and init["weights"]["adv"] == 0.0
    aug = params["augment"]["common"]
    assert aug["model"] == "sd-image-variations" and aug["k"] == 4 and aug["sources"] == 0
    assert params["distill"]["dda_noaug"] == params["distill"]["dda"]


def test_dfnd_study_reproduces_the_paper_with_plain_top_k() -> None:
    params = yaml.safe_load((ROOT / "pipelines" / "cifar10-dfnd" / "params.yaml").read_text())["retrieve"]
    assert params["common"]["balance"] is False
    assert any(v.get("balance") is True for k, v in params.items() if k != "common" and isinstance(v, dict))


# ------------------------------------------------------------------------------------ 5. CPNet
def test_coupled_generator_taps_stage_tensors_after_the_activation() -> None:
    info = _info()
    stages = teacher_stages(_teacher(info), 1, 32)
    torch.manual_seed(0)
    act = CoupledGenerator(stages, 16, 32, 1, tap="act")
    torch.manual_seed(0)
    bn = CoupledGenerator(stages, 16, 32, 1, tap="bn")
    z = torch.randn(8, 16)
    _, outs_act = act(z, return_stages=True)
    _, outs_bn = bn(z, return_stages=True)
    assert torch.equal(outs_act[0], outs_bn[0])  # the first stage: bn0's output in both
    # later stages: after LeakyReLU (released code), i.e. negatives scaled by 0.2 where the BN output had them
    bn_out: list[torch.Tensor] = []
    handle = act.blocks[0]["bn"].register_forward_hook(lambda m, i, o: bn_out.append(o))
    act(z, return_stages=True)
    handle.remove()
    assert torch.allclose(outs_act[1], F.leaky_relu(bn_out[0], 0.2))
    assert float(outs_act[1].min()) < 0 and float(outs_act[1].min()) > float(bn_out[0].min())


def test_cpnet_xn_target_statistics_blend_with_their_ema() -> None:
    info = _info()
    cfg = {"batch_size": 20, "g_steps": 1, "embedding": {"source": "random", "dim": 32}}
    synth = build_synthesizer("cpnet", _teacher(info), info, cfg, ENGINE, 0)
    synth.synthesize(0)
    assert synth.xn_ema is not None
    ema = [(m.clone(), v.clone()) for m, v in synth.xn_ema]
    phis = [torch.randn(20, t[0].shape[1], 4, 4) * 3 + 1 for t in ema]
    blended = synth.xn_stats(phis)
    for (bm, bv), (em, ev), phi in zip(blended, ema, phis, strict=True):
        var, mean = torch.var_mean(phi, dim=(0, 2, 3), keepdim=True, correction=0)
        assert torch.allclose(bm, 0.1 * mean + 0.9 * em, atol=1e-5)
        assert torch.allclose(bv, 0.1 * var + 0.9 * ev, atol=1e-5)
    from dfkd_common.errors import DfkdError

    for bad in ({"cutmix_mode": "pixel"}, {"g_tap": "relu"}):
        with pytest.raises(DfkdError, match=next(iter(bad))):
            build_synthesizer("cpnet", _teacher(info), info, {**cfg, **bad}, ENGINE, 0)
    off = build_synthesizer("cpnet", _teacher(info), info, {**cfg, "xn_momentum": 0.0}, ENGINE, 0)
    off.synthesize(0)
    assert off.xn_ema is None


# ------------------------------------------------------------------------------------ 6. DAFL
def test_dafl_entropy_term_in_log10_is_ln10_weaker() -> None:
    t = torch.randn(64, 10)
    ctx = Context(x=torch.zeros(64, 1), t_logits=t)
    ln = float(entropy_balance_term(ctx, {"log10": False}))
    assert float(entropy_balance_term(ctx, {"log10": True})) == pytest.approx(ln / math.log(10), rel=1e-6)


def test_dafl_released_numerics_are_options() -> None:
    info = _info()
    synth = build_synthesizer("dafl", _teacher(info), info,
                              {"batch_size": 8, "g_steps": 1, "bn_eps": 0.8, "act_layer": "net.features"}, ENGINE, 0)
    assert all(m.eps == 0.8 for m in synth.generator.modules() if isinstance(m, nn.BatchNorm2d) and m.affine)
    ctx = synth.context(torch.rand(8, 1, 32, 32), None)
    assert ctx.t_feat is not None and ctx.t_feat.shape == (8, 120)  # LeNet-5's conv-stack output
    from dfkd_common.errors import DfkdError

    with pytest.raises(DfkdError, match="act_layer"):
        build_synthesizer("dafl", _teacher(info), info, {"act_layer": "nope"}, ENGINE, 0)


# ------------------------------------------------------------------------------------ metrics and report
def test_metrics_files_hold_only_the_headline_and_the_details_sit_beside(tmp_path: Path) -> None:
    path = tmp_path / "fast.metrics.json"
    write_metrics(path, {"test_acc": 0.9, "per_class": {"0": 3}, "name": "fast"}, test_acc=0.9, x_teacher=0.95)
    import json

    assert set(json.loads(path.read_text())) <= set(headline_keys())
    assert details_path(path).name == "fast.details.json"
    assert json.loads(details_path(path).read_text())["per_class"] == {"0": 3}
    with pytest.raises(ValueError):
        write_metrics(path, {}, per_class=1)


def test_report_table_shows_the_seed_spread_of_runs_with_one_name() -> None:
    rows = [{"name": "nayer", "test_acc": a, "ratio_to_teacher": a / 0.98, "seconds": 60, "bank_size": 10}
            for a in (0.96, 0.97, 0.98)]
    md = markdown_table(rows, {"test_acc": 0.98, "arch": "lenet5"})
    line = next(x for x in md.splitlines() if x.startswith("| nayer"))
    assert "| 3 |" in line and "97.00 +- 1.00" in line
