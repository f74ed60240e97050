"""Fast (Fang et al., AAAI 2022, "Up to 100x Faster Data-free Knowledge Distillation"): a meta-generator.

CMI-style synthesis optimises a freshly initialised generator for hundreds of steps per batch. Fast instead
keeps a persistent *meta*-generator that has learnt common features across batches, so each round needs only
``g_steps`` (2/5/10) steps: clone the meta-generator, optimise the clone together with a fresh latent ``z`` on
``bn * L_bn(momentum) + oh * L_oh + adv * L_adv``, and feed the clone's gradients back to the meta-generator
(first-order MAML: the meta gradient is the sum of the clone's gradients over its steps, applied once per
round by the meta optimiser, whose learning rate defaults to ``lr_g * g_steps`` so the meta-generator moves as
far as the clone did). The lowest-loss iterate of each round goes to the bank.

Differs from the base machinery only in what is optimised; the loss is the registered terms, BN statistics
use the momentum variant (``bn_momentum`` 0.9: one small batch need not match the whole data distribution on
its own). Registered defaults are the published Fast-5 recipe for a WRN-40-2 teacher (g_steps 5, lr_g 3e-3,
lr_z 0.01, adv 1.1, oh 0.4; Fast-2 is 2 / 5e-3 / 0.015, Fast-10 10 / 2e-3 / 0.01, and a ResNet-34 teacher takes
adv 1.33, oh 0.5); the MNIST ones live in params.yaml.

``reset_l0: N`` re-initialises the meta-generator's first layer (its Linear, N(0, 0.02) weights, bias 0, and
that layer's meta-optimiser state) before the N-th synthesis round, as the published CIFAR scripts do at round
140 (their ``ep == 120 + warmup``): a first layer that has specialised to few modes by then is given a fresh
start while the convolutional layers keep what they learnt. ``None`` (default) never resets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.models import build_generator
from dfkd_common.synthesis.base import SYNTHESIZERS, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


def accumulate_grads(meta: nn.Module, fast: nn.Module) -> None:
    """First-order MAML: add the clone's current parameter gradients to the meta-generator's ``.grad``."""
    for p_meta, p_fast in zip(meta.parameters(), fast.parameters(), strict=True):
        if p_fast.grad is None:
            continue
        if p_meta.grad is None:
            p_meta.grad = p_fast.grad.detach().clone()
        else:
            p_meta.grad.add_(p_fast.grad.detach())


@SYNTHESIZERS.register("fast")
class Fast(Synthesizer):
    name = "fast"

    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 5
        nz: int = 256
        ngf: int = 64
        lr_g: float = 3e-3  # clone (inner) Adam
        lr_z: float = 0.01  # the round's latent codes
        meta_lr: float | None = None  # None: lr_g * g_steps
        betas: tuple[float, float] = (0.5, 0.999)
        bn_momentum: float = 0.9
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 10.0, "oh": 0.4, "adv": 1.1})
        augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=4, flip=True))
        reset_l0: int | None = None  # synthesis round (1-based) before which the first layer is re-initialised

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        info = self.info
        self.generator = self.engine.model(
            build_generator("dcgan", nz=self.cfg.nz, ngf=self.cfg.ngf, image_size=info.image_size,
                            channels=info.channels, head="sigmoid", mean=info.mean, std=info.std)
        ).train()
        meta_lr = self.cfg.meta_lr
        meta_lr = self.cfg.lr_g * self.cfg.g_steps if meta_lr is None else float(meta_lr)
        self.meta_opt = torch.optim.Adam(self.generator.parameters(), lr=meta_lr, betas=self.cfg.betas)

    @torch.no_grad()
    def reset_first_layer(self) -> None:
        """``reset_l0``: fresh N(0, 0.02) weights and zero bias for the meta-generator's Linear, and no stale
        Adam moments for it."""
        first = next(m for m in self.generator.modules() if isinstance(m, nn.Linear))
        first.weight.normal_(0.0, 0.02)
        first.bias.zero_()
        for p in (first.weight, first.bias):
            self.meta_opt.state.pop(p, None)

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        if self.cfg.reset_l0 is not None and round_index + 1 == self.cfg.reset_l0:
            self.reset_first_layer()
        b, nz = self.cfg.batch_size, self.cfg.nz
        y = self.targets(b, round_index)
        fast = copy.deepcopy(self.generator).train()
        z = self.noise(b, nz).requires_grad_(True)
        opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.cfg.lr_z}],
                               lr=self.cfg.lr_g, betas=self.cfg.betas)
        self.meta_opt.zero_grad(set_to_none=True)

        def step() -> tuple[torch.Tensor, Context]:
            x = fast(z)
            return x, self.context(x, y, student)

        best_x, _, logs = self.optimise(self.cfg.g_steps, step, opt,
                                        after_backward=lambda: accumulate_grads(self.generator, fast))
        self.meta_opt.step()
        self.end_round()
        return SynthResult(best_x.float().clamp(0, 1).cpu(), y.cpu(), logs)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "meta_opt": self.meta_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.meta_opt.load_state_dict(state["meta_opt"])
