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
``cfg["embedding"]["used"]`` (it reaches the bank's params attribute).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.embeddings import DEFAULT_TEMPLATE, class_embeddings
from dfkd_common.engine import fused_adam
from dfkd_common.models.conditional import LabelGenerator, NoisyEmbeddingInput
from dfkd_common.models.generators import DCGenerator
from dfkd_common.synthesis.base import SYNTHESIZERS, Synthesizer, SynthResult
from dfkd_common.synthesis.losses import Context


@SYNTHESIZERS.register("nayer")
class NAYER(Synthesizer):
    name = "nayer"
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256,
        "g_steps": 30,
        "lr_g": 4e-3,
        "betas": [0.5, 0.999],
        "g_life": 10,
        "ngf": 64,
        "noisy_chunk": None,  # samples per noisy layer; None = the number of classes
        "noisy_dim": 1000,  # the noisy layer's output size (the published default); None = the embedding's
        "bn_momentum": 0.9,
        "weights": {"bn": 10.0, "oh": 0.5, "adv": 1.33},
        "embedding": {"source": "auto", "path": None, "template": DEFAULT_TEMPLATE, "dim": 256},
    }

    param_types: ClassVar[dict[str, type]] = {"noisy_chunk": int, "noisy_dim": int}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = self.info.class_names
        if all(re.fullmatch(r"class_\d+", str(n)) for n in names):
            warnings.warn(f"{self.name}: the teacher's class names are placeholders ({names[0]}, ...); the text "
                          "embeddings carry no class meaning (see the dataset's class-name source)", stacklevel=2)
        emb = self.cfg["embedding"]
        result = class_embeddings(
            self.info.class_names, source=str(emb.get("source", "auto")), path=emb.get("path"),
            template=str(emb.get("template", DEFAULT_TEMPLATE)), dim=int(emb.get("dim", 256)),
            seed=int(emb.get("seed", 0)),
        )
        self.table = result.vectors
        self.cfg["embedding"]["used"] = result.source
        self.generator = self.build_generator()
        self.built_at = 0  # the epoch the current generator was built in

    # -- generator ---------------------------------------------------------------------------------
    def make_body(self, nz: int) -> nn.Module:
        """The image-producing part after the noisy layer (CPNet overrides it with the coupled generator)."""
        info = self.info
        return DCGenerator(nz=nz, ngf=int(self.cfg["ngf"]), image_size=info.image_size, channels=info.channels,
                           head="sigmoid")

    def build_generator(self) -> LabelGenerator:
        chunk = int(self.cfg["noisy_chunk"] or self.info.num_classes)
        dim = self.cfg["noisy_dim"]
        inputs = NoisyEmbeddingInput(self.table, int(self.cfg["batch_size"]), chunk,
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
        if epoch - self.built_at >= int(self.cfg["g_life"]) or epoch < self.built_at:
            self.generator = self.build_generator()
            self.built_at = epoch

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        y = self.labels(int(self.cfg["batch_size"]), round_index)
        self.generator.train()
        self.generator.reinit_noise()
        opt = fused_adam(self.generator.parameters(), lr=float(self.cfg["lr_g"]), betas=tuple(self.cfg["betas"]))

        def step() -> tuple[torch.Tensor, Context]:
            x, g_stages = self.generate(y)
            return x, self.make_context(x, y, student, g_stages)

        best_x, best_loss, logs = self.optimise(int(self.cfg["g_steps"]), step, opt)
        self.end_round()
        return SynthResult(best_x.clamp(0, 1).cpu(), y.cpu(), {**logs, "best_loss": best_loss})

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "table": self.table, "embedding_used": self.cfg["embedding"]["used"],
                "generator": self.generator.state_dict(), "built_at": self.built_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.table = state["table"].float()
        self.cfg["embedding"]["used"] = state["embedding_used"]
        self.generator = self.build_generator()
        self.generator.load_state_dict(state["generator"])
        self.built_at = int(state["built_at"])
