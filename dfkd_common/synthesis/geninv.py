"""Generative inversion with a fresh generator every round (CMI-style), and RGAL on top of it.

``geninv``: CMI's synthesis loop (Fang et al., IJCAI 2021) *without* CMI's contrastive term, so nothing here is
called CMI. Every round re-initialises the DCGAN generator (conv/linear weights N(0, 0.02), bias 0; BN gamma
N(1, 0.02), beta 0; sigmoid output) and draws a fresh latent z (nz 256), then optimises generator and z together
with Adam (lr_g 1e-3, betas 0.5/0.999) for ``g_steps``; the lowest-loss iterate of the batch goes to the bank.
Targets are balanced sampled classes. Loss: bn*L_bn + oh*CE + adv*L_adv (L_adv only against a student). It is
RGAL's base, the "RGAL without relation terms" ablation, and DDA's CSD base (:mod:`dfkd_common.synthesis.csd`).
The initial weights are drawn from the synthesizer's own generator, so a resumed run re-creates exactly the
generators an uninterrupted one would.

``rgal`` (Liang et al., IJCV 2024): ``geninv`` plus the synthesis relation term ``triplet`` (weight 0.1, swap mode:
see :mod:`dfkd_common.relation`); its student side is KD at tau 20 + ``striplet`` + ``cd``
(:mod:`dfkd_common.student.relation`), its ``student_objective``: ``dfkd distill --online rgal`` runs them unless the
run's ``distill`` params give their own objective. The relation terms are ordinary
registered terms: any method turns them on by weight (``cpnet_rgal`` in params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_common.models.generators import DCGenerator
from dfkd_common.synthesis.base import SYNTHESIZERS, StudentObjective, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("geninv")
class GenerativeInversion(Synthesizer):
    name = "geninv"

    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 200
        lr_g: float = 1e-3
        betas: tuple[float, float] = (0.5, 0.999)
        nz: int = 256
        ngf: int = 64
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 1.0, "oh": 1.0, "adv": 1.0})

    def build_generator(self) -> nn.Module:
        """A DCGAN generator with the published initialisation, drawn from this synthesizer's generator."""
        info = self.info
        g = DCGenerator(nz=self.cfg.nz, ngf=self.cfg.ngf, image_size=info.image_size,
                        channels=info.channels, head="sigmoid")
        with torch.no_grad():
            for m in g.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.normal_(0.0, 0.02, generator=self.gen)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.BatchNorm2d) and m.affine:
                    m.weight.normal_(1.0, 0.02, generator=self.gen)
                    m.bias.zero_()
        return self.engine.model(g.to(self.device))

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        result = self.invert(round_index, student)
        self.end_round()
        return result

    def invert(self, round_index: int, student: Any = None) -> SynthResult:
        """One round: a fresh generator and latent optimised for ``g_steps``; the lowest-loss iterate."""
        bs = self.cfg.batch_size
        y = self.targets(bs, round_index)
        generator = self.build_generator().train()
        z = self.noise(bs, self.cfg.nz).requires_grad_(True)
        opt = torch.optim.Adam([{"params": generator.parameters()}, {"params": [z]}], lr=self.cfg.lr_g,
                               betas=self.cfg.betas)

        def step() -> tuple[torch.Tensor, Context]:
            with self.engine.autocast():
                x = generator(z).float()
            return x, self.context(x, y, student)

        best_x, best_loss, logs = self.optimise(self.cfg.g_steps, step, opt)
        return SynthResult(best_x.clamp(0, 1).cpu(), y.cpu(), {**logs, "best_loss": best_loss})


@SYNTHESIZERS.register("rgal")
class RGAL(GenerativeInversion):
    name = "rgal"

    @dataclass(frozen=True)
    class Config(GenerativeInversion.Config):
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 1.0, "oh": 1.0, "adv": 1.0, "triplet": 0.1})
        terms: dict[str, dict[str, Any]] = field(default_factory=lambda: {
            "triplet": {"target": "student", "stages": [-1], "mode": "swap"}})

    student_objective = StudentObjective(weights={"kd": 1.0, "striplet": 0.1, "cd": 0.1},
                                         terms={"kd": {"tau": 20.0}})
