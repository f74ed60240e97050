"""DAFL (Chen et al., ICCV 2019): a generator trained so the teacher is confident, balanced and excited.

Differs from DeepInversion in the optimised object (a persistent DCGAN-style generator with DAFL's
``tanh -> BN(affine=False)`` output) and the loss: oh*CE(T(x), argmax T(x)) + ie*entropy balance +
act*(-|penultimate features|), MNIST weights 1 / 5 / 0.1. The published method trains the student on fresh
G(z) at every generator step; as an *offline* synthesizer we train G for ``g_steps`` per round and then
sample the round's images into the bank, so the bank follows G's trajectory the way DAFL's student sees it.
Labels are the teacher's argmax (DAFL has no targets).

The released code's numerics are options (README "DAFL"): ``terms: {ie: {log10: true}}`` (its entropy in log10,
2.3x weaker than ours at the same weight), ``bn_eps: 0.8`` (its generator's BN), ``lr_g: 0.2`` (its MNIST
lr_G), ``act_layer: net.features`` (LeNet-5's 120-d conv-stack output for the activation term) and the student's
``terms: {kd: {tau: 1}}``. The default pipeline keeps natural log, eps 1e-5, the penultimate features and KD
at tau 4: the bank there is distilled offline by the same student loop as every other bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.errors import DfkdError
from dfkd_common.models import build_generator
from dfkd_common.models.hooks import FeatureHooks
from dfkd_common.synthesis.base import SYNTHESIZERS, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("dafl")
class DAFL(Synthesizer):
    name = "dafl"
    #: a segmentation teacher's targets are its masks; ``ie`` balances its pixels' classes (DFAD's DAFL baseline)
    tasks = ("classification", "segmentation")

    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 20
        nz: int = 100
        ngf: int = 64
        lr_g: float = 0.02
        weights: dict[str, float] = field(default_factory=lambda: {"oh": 1.0, "ie": 5.0, "act": 0.1})
        augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=0))
        bn_eps: float = 1e-5  # the generator's BatchNorm eps (released code: 0.8)
        act_layer: str | None = None  # module whose output the act term reads; None = the penultimate features

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        info = self.info
        self.generator = self.engine.model(
            build_generator(
                "dcgan",
                nz=self.cfg.nz,
                ngf=self.cfg.ngf,
                image_size=info.image_size,
                channels=info.channels,
                head="dafl",
                mean=info.mean,
                std=info.std,
                bn_eps=self.cfg.bn_eps,
            )
        )
        layer = self.cfg.act_layer
        if layer and str(layer) not in dict(self.teacher.named_modules()):
            raise DfkdError(f"dafl: act_layer {layer!r} is not a module of the teacher "
                            f"({type(self.teacher).__name__})")
        self.act_hooks = FeatureHooks(self.teacher, [str(layer)]) if layer else None
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr_g)

    def context(self, x: torch.Tensor, y: torch.Tensor | None, student: Any = None) -> Context:
        """With ``act_layer`` the activation term reads that module's output (DAFL's LeNet-5: the 120-d output
        of the conv stack, ``net.features``) instead of the penultimate features."""
        ctx = super().context(x, y, student)
        if self.act_hooks is not None:
            ctx.t_feat = self.act_hooks.features[self.cfg.act_layer].flatten(1)
        return ctx

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        b, nz = self.cfg.batch_size, self.cfg.nz
        self.generator.train()

        def step() -> tuple[torch.Tensor, Context]:
            x = self.generator(self.noise(b, nz))
            return x, self.context(x, None, student)

        _, _, logs = self.optimise(self.cfg.g_steps, step, self.opt)  # DAFL samples afresh: no best iterate
        self.end_round()
        x = self.sample(b).clamp(0, 1)
        return SynthResult(x.cpu(), self.teacher_targets(x), logs)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images from the current generator (train-mode BN, as DAFL samples)."""
        return self.generator(self.noise(n, self.cfg.nz)).float()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])
