"""DeepInversion (Yin et al., CVPR 2020): optimise the pixels of each batch directly.

Differs from the generator methods only in what is optimised: a batch of free pixels (parametrised in the
teacher's normalised space, where one Adam step of lr 0.1 means the same for every dataset, and projected back
to [0, 1] after every optimiser step, as the reference code clips its variable: a clamp inside the forward pass
alone gives a pixel outside the range zero gradient, so it would never move again) under
bn*L_bn + oh*CE + tv*TV + l2*||x||^2. Slow but simple and generator-free.
The lowest-loss iterate of each round goes to the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dfkd_common.synthesis.base import SYNTHESIZERS, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(Synthesizer):
    name = "deepinversion"
    #: a segmentation teacher too: no targets drawn, ``oh`` is the per-pixel CE against the teacher's own
    #: prediction, the bank's masks are the teacher's on the images made
    tasks = ("classification", "segmentation")

    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 200
        lr: float = 0.1
        betas: tuple[float, float] = (0.5, 0.99)
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 1.0, "oh": 1.0, "tv": 0.1, "l2": 0.0})

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        b, info = self.cfg.batch_size, self.info
        mean = self.teacher.mean.to(self.device)
        std = self.teacher.std.to(self.device)
        y = self.targets(b, round_index)
        v = self.noise(b, *info.shape).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.cfg.lr, betas=self.cfg.betas)

        lo, hi = (0 - mean) / std, (1 - mean) / std  # [0, 1] in the normalised space, per channel

        def step() -> tuple[torch.Tensor, Context]:
            x = v * std + mean
            return x, self.context(x, y, student)

        @torch.no_grad()
        def project() -> None:
            v.copy_(torch.maximum(torch.minimum(v, hi), lo))

        project()  # the random start too
        best_x, _, logs = self.optimise(self.cfg.g_steps, step, opt, after_step=project)
        self.end_round()
        images = best_x.float().cpu()
        return SynthResult(images, y.cpu() if y is not None else self.teacher_targets(images), logs)
