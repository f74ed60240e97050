"""NAYER (Tran et al., CVPR 2024): a text-embedding-conditioned generator with a re-initialised noisy layer.

What differs from the other generator methods:

* **Input**: no noise vector. Each target class's prompt ("an image of a {class}") is embedded once by a text
  model (:mod:`dfkd_common.embeddings`: local CLIP, the packaged all-MiniLM-L6-v2 by default, seeded random as
  last resort), and the generator sees BatchNorm1d(embedding) passed through a *noisy layer*
  (:class:`~dfkd_common.models.conditional.NoisyEmbeddingInput`), one Linear per chunk of ``noisy_chunk``
  samples to ``noisy_dim`` (1000) outputs, re-initialised N(0, 1) with bias 0 before every batch, as published.
  Randomness lives in that layer, meaning lives in the embedding.
* **Schedule**: one round = one batch (the online feed runs ``g_loops`` rounds per epoch, more during warm-up).
  The persistent generator and the fresh noisy layers are optimised together for ``g_steps`` with a fresh Adam
  (lr ``lr_g``, betas 0.5/0.999, as the published code), and the *lowest-loss iterate* of the round goes to the
  bank. The whole generator is rebuilt every ``g_life`` epochs of the student (:meth:`begin_epoch`; offline,
  where there are no epochs, every round counts as one), so it does not collapse onto the few modes it found
  first.
* **Loss**: bn*L_bn (momentum 0.9 EMA of batch statistics) + oh*CE + adv*L_adv, published weights 10 / 0.5 /
  1.33. L_adv is only active when a student is passed (after the online feed's warm-up; never offline).

The class embeddings are kept in the synthesizer's resumable state, so a resumed run reuses the vectors the run
started with even if the text model changed or went missing, and the source actually used is recorded in
``embedding.used`` of the bank's params attribute (:meth:`NAYER.provenance`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_common.embeddings import EmbeddingConfig, class_embeddings
from dfkd_common.engine import fused_adam
from dfkd_common.models.conditional import LabelGenerator, NoisyEmbeddingInput
from dfkd_common.models.generators import DCGenerator
from dfkd_common.synthesis.base import SYNTHESIZERS, SynthesisConfig, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("nayer")
class NAYER(Synthesizer):
    name = "nayer"

    @dataclass(frozen=True)
    class Config(SynthesisConfig):
        g_steps: int = 30
        lr_g: float = 4e-3
        betas: tuple[float, float] = (0.5, 0.999)
        g_life: int = 10
        ngf: int = 64
        noisy_chunk: int | None = None  # samples per noisy layer; None = the number of classes
        noisy_dim: int | None = 1000  # the noisy layer's output size (the published default); None = the embedding's
        bn_momentum: float = 0.9
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 10.0, "oh": 0.5, "adv": 1.33})
        embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = self.info.class_names
        if all(re.fullmatch(r"class_\d+", str(n)) for n in names):
            warnings.warn(f"{self.name}: the teacher's class names are placeholders ({names[0]}, ...); the text "
                          "embeddings carry no class meaning (see the dataset's class-name source)", stacklevel=2)
        emb = self.cfg.embedding
        result = class_embeddings(self.info.class_names, source=emb.source, path=emb.path, template=emb.template,
                                  dim=emb.dim, seed=emb.seed)
        self.table = result.vectors
        self.embedding_used = result.source  # the source the vectors came from (a resume keeps the first)
        self.generator = self.build_generator()
        self.built_at = 0  # the epoch the current generator was built in

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["embedding"]["used"] = self.embedding_used
        return out

    # -- generator ---------------------------------------------------------------------------------
    def make_body(self, nz: int) -> nn.Module:
        """The image-producing part after the noisy layer (CPNet overrides it with the coupled generator)."""
        info = self.info
        return DCGenerator(nz=nz, ngf=self.cfg.ngf, image_size=info.image_size, channels=info.channels,
                           head="sigmoid")

    def build_generator(self) -> LabelGenerator:
        chunk = int(self.cfg.noisy_chunk or self.info.num_classes)
        dim = self.cfg.noisy_dim
        inputs = NoisyEmbeddingInput(self.table, self.cfg.batch_size, chunk,
                                     int(dim) if dim is not None else None)
        return self.engine.model(LabelGenerator(inputs, self.make_body(inputs.out_dim)))

    def labels(self, n: int, round_index: int) -> torch.Tensor:
        """Consecutive classes (every chunk of K samples holds each class once), rotating with the round."""
        return ((torch.arange(n) + round_index * n) % self.info.num_classes).to(self.device)

    def generate(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images for labels ``y`` and the generator's stage tensors where the loss context needs them (CPNet)."""
        with self.engine.autocast():
            x = self.generator(y)
        return x.float(), None

    def make_context(self, x: torch.Tensor, y: torch.Tensor, student: Any,
                     g_stages: list[torch.Tensor] | None) -> Context:
        return self.context(x, y, student)

    # -- one round -----------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Rebuild the whole generator once it has lived ``g_life`` epochs (NAYER's ``g_life``)."""
        if epoch - self.built_at >= self.cfg.g_life or epoch < self.built_at:
            self.generator = self.build_generator()
            self.built_at = epoch

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        y = self.labels(self.cfg.batch_size, round_index)
        self.generator.train()
        self.generator.reinit_noise()
        opt = fused_adam(self.generator.parameters(), lr=self.cfg.lr_g, betas=self.cfg.betas)

        def step() -> tuple[torch.Tensor, Context]:
            x, g_stages = self.generate(y)
            return x, self.make_context(x, y, student, g_stages)

        best_x, best_loss, logs = self.optimise(self.cfg.g_steps, step, opt)
        self.end_round()
        return SynthResult(best_x.clamp(0, 1).cpu(), y.cpu(), {**logs, "best_loss": best_loss})

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "table": self.table, "embedding_used": self.embedding_used,
                "generator": self.generator.state_dict(), "built_at": self.built_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.table = state["table"].float()
        self.embedding_used = str(state["embedding_used"])
        self.generator = self.build_generator()
        self.generator.load_state_dict(state["generator"])
        self.built_at = int(state["built_at"])
