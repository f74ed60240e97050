"""DAFL (Chen et al., ICCV 2019): a generator trained so the teacher is confident, balanced and excited.

Differs from DeepInversion in the optimised object (a persistent DCGAN-style generator with DAFL's
``tanh -> BN(affine=False)`` output) and the loss: oh*CE(T(x), argmax T(x)) + ie*entropy balance +
act*(-|penultimate features|), MNIST weights 1 / 5 / 0.1. The published method trains the student on fresh
G(z) at every generator step; as an *offline* synthesizer we train G for ``g_steps`` per round and then
sample the round's images into the bank, so the bank follows G's trajectory the way DAFL's student sees it.
Labels are the teacher's argmax (DAFL has no targets).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd_common.models import build_generator
from dfkd_common.synthesis.base import SYNTHESIZERS, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("dafl")
class DAFL(Synthesizer):
    name = "dafl"
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256,
        "g_steps": 20,
        "nz": 100,
        "ngf": 64,
        "lr_g": 0.02,
        "weights": {"oh": 1.0, "ie": 5.0, "act": 0.1},
        "augment": {"crop_pad": 0},
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        info = self.info
        self.generator = self.engine.model(
            build_generator(
                "dcgan",
                nz=int(self.cfg["nz"]),
                ngf=int(self.cfg["ngf"]),
                image_size=info.image_size,
                channels=info.channels,
                head="dafl",
                mean=info.mean,
                std=info.std,
            )
        )
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=float(self.cfg["lr_g"]))

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        b, nz = int(self.cfg["batch_size"]), int(self.cfg["nz"])
        self.generator.train()

        def step() -> tuple[torch.Tensor, Context]:
            x = self.generator(self.noise(b, nz))
            return x, self.context(x, None, student)

        _, _, logs = self.optimise(int(self.cfg["g_steps"]), step, self.opt)  # DAFL samples afresh: no best iterate
        self.end_round()
        x = self.sample(b)
        with torch.no_grad(), self.engine.autocast():
            y = self.teacher(self.engine.images(x.clamp(0, 1))).argmax(1)
        return SynthResult(x.clamp(0, 1).cpu(), y.cpu(), logs)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images from the current generator (train-mode BN, as DAFL samples)."""
        return self.generator(self.noise(n, int(self.cfg["nz"]))).float()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])
