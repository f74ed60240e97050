"""DFAD (Fang et al., "Data-Free Adversarial Distillation"): a generator and the student play a min-max game.

Per iteration the student takes ``student_steps`` (5) steps minimising the mean L1 distance between its logits
and the teacher's on fresh, detached ``x = G(z)``; then the generator takes one step *maximising* that
distance, so it keeps producing the inputs the student imitates worst. No bank is needed.

How it fits the method-agnostic distillation loop without a special case: the student side is the ordinary
loop with the student loss ``l1`` (:mod:`dfkd_common.student.l1`); the generator side is :class:`DFADFeed`, whose
:meth:`DFADFeed.batches` hands the loop a fresh ``G(z)`` for every student step and takes a generator step
against the (just updated) student before every ``student_steps``-th batch. The loop's optimiser, cosine
schedule, resume and metrics therefore apply unchanged; an epoch is ``iterations x student_steps`` student
steps (the loop's ``kd_steps``, derived from the feed's length unless set). The generator is DAFL's
(``tanh -> BN(affine=False)`` output, i.e. normalised images mapped back to pixel space), in train mode
throughout, as in the published code; the student stays in train mode during generator steps as well.
The generator's learning rate decays with the student's (the published code steps both schedulers): with a
constant ``lr_g`` the generator keeps winning once the student's cosine LR nears zero, and the student
collapses in the last epochs (measured on mnist5k: 0.93 -> 0.21 test accuracy in the final epoch).

Two options are not in the published method and are off by default; the default pipeline's ``dfad_priors`` run
turns both on. ``ie`` adds DAFL's information-entropy term (the registered ``ie`` loss term, sum_k pbar_k log
pbar_k of the teacher's batch-mean prediction) to the generator's loss with that weight: published DFAD has no
diversity pressure, and on mnist5k its generator settles on a few classes (0s and 1s are about 1 % of its images,
so the student reads real 1s as 7s and 0s as 8s; final accuracy 79-94 % over four seeds). ``bn`` adds
DeepInversion's BN-statistics prior (the registered ``bn`` term, hooks on the teacher's BatchNorm2d layers).
Why: with ``ie`` alone the generator keeps winning, its L1 discrepancy rising from 0.79 to 0.84-0.86 over the
epochs while the student's test accuracy peaks after about 5 epochs and then falls (93-96 % final over four
seeds, 0.963 x teacher). Tying G(z)'s feature statistics to the teacher's running ones confines where the
generator can attack; the discrepancy then falls (0.85 -> 0.66) and the accuracy rises to the last epoch
(ie 5 + bn 1: 96.8-97.0 % over four seeds, 0.988 x teacher; docs/RESULTS.md). The student side is
unchanged.

What the feed records: the first ``record`` images of every epoch (teacher labels and logits), round index =
epoch, so ``dfkd bank info/grid`` shows how the generator evolved. Nothing is replayed from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dfkd_common.config import parse
from dfkd_common.dist import gather_objects
from dfkd_common.engine import check_finite, fused_adam
from dfkd_common.errors import DfkdError
from dfkd_common.functional import l1_discrepancy
from dfkd_common.index import WITHOUT_BN
from dfkd_common.models import build_generator
from dfkd_common.models.hooks import BNStats
from dfkd_common.online.base import ONLINE, FeedContext, RecordedFeed, frozen
from dfkd_common.synthesis.base import student_network
from dfkd_common.synthesis.losses import TERMS, Context


@ONLINE.register("dfad")
class DFADFeed(RecordedFeed):
    """The generator side of DFAD (see the module docstring). All ``online:`` params configure this feed.

    Under torchrun every rank plays its own generator (seeded ``seed + rank``) against the shared student, so its
    batches are its own: the loop does not shard them (:attr:`per_rank_batches`).
    """

    per_rank_batches = True
    takes_banks = False

    #: per-pixel logits need nothing else: the L1 discrepancy is over every output (index.TASKS_SERVED)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation")

    @dataclass(frozen=True)
    class Config:
        nz: int = 100  # latent size (MNIST 100, CIFAR 256)
        ngf: int = 64
        head: str = "dafl"
        # the generator's x2 stages (None: 2 up to 128 px, DAFL's; the released segmentation scripts' GeneratorB
        # doubles 4 times from S/16)
        ups: int | None = None
        lr_g: float = 1e-3  # Adam
        # the generator's LR follows the student's cosine schedule ("constant": no decay)
        g_schedule: Literal["cosine", "constant"] = "cosine"
        betas: tuple[float, float] = (0.9, 0.999)
        student_steps: int = 5  # student steps per generator step
        iterations: int = 50  # generator steps per epoch
        record: int = 100  # images of each epoch kept in the output bank
        ie: float = 0.0  # weight of DAFL's class-balance entropy term in the generator loss; 0: published DFAD
        bn: float = 0.0  # weight of DeepInversion's BN-statistics prior in the generator loss; 0: published DFAD
        # the generator maximises the L1 ("l1", the classification scripts) or log(L1 + 1) ("log", the released
        # segmentation scripts); "auto": log for a segmentation teacher, l1 otherwise
        g_loss: Literal["auto", "l1", "log"] = "auto"

    def __init__(self, ctx: FeedContext, cfg: Mapping[str, Any] | Config | None = None) -> None:
        cfg = cfg if isinstance(cfg, DFADFeed.Config) else parse(DFADFeed.Config, cfg, "dfad online")
        if ctx.initial is not None and len(ctx.initial):
            raise DfkdError("dfad trains on fresh generator samples only; run it without --bank")
        super().__init__(ctx, cfg)
        info, engine = ctx.info, ctx.engine
        self.nz = cfg.nz
        self.log_loss = cfg.g_loss == "log" or (cfg.g_loss == "auto" and info.task == "segmentation")
        self.student_steps = cfg.student_steps
        self.iterations = cfg.iterations
        self.to_record = cfg.record
        self.ie = cfg.ie
        self.bn_weight = cfg.bn
        self.bn: BNStats | None = None
        if self.bn_weight:
            self.bn = BNStats(self.teacher)
            if not len(self.bn):
                raise DfkdError("dfad: online.bn needs BatchNorm2d layers in the teacher, and it has none; published "
                                f"DFAD (online.bn 0) needs none, nor do {WITHOUT_BN}")
            self.bn.enable(False)
        if self.student_steps < 1 or self.iterations < 1:
            raise DfkdError("dfad: student_steps and iterations must be >= 1")
        self.generator = engine.model(build_generator(
            "dcgan", nz=self.nz, ngf=cfg.ngf, image_size=info.image_size, channels=info.channels,
            head=cfg.head, mean=info.mean, std=info.std, ups=cfg.ups,
        )).train()
        self.opt = fused_adam(self.generator.parameters(), lr=cfg.lr_g, betas=cfg.betas)
        self.gen = torch.Generator().manual_seed(ctx.seed + 1)
        self.step = 0  # student batches handed out so far (all epochs)
        self.student: nn.Module | None = None
        self.pending_record = False
        self.epoch_logs: dict[str, float] = {}
        self.g_sum, self.g_count = 0.0, 0

    @classmethod
    def create(cls, method: str, ctx: FeedContext, cfg: Mapping[str, Any]) -> DFADFeed:
        return cls(ctx, cfg)

    def __len__(self) -> int:
        """Images the student sees per epoch; the loop derives ``iterations x student_steps`` batches from it."""
        return self.iterations * self.student_steps * self.ctx.batch_size

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.nz, generator=self.gen).to(self.device)

    def before_epoch(self, epoch: int, side: nn.Module) -> dict[str, float]:
        self.start()
        scale = 1.0
        if self.cfg.g_schedule == "cosine":
            scale = 0.5 * (1 + math.cos(math.pi * epoch / max(1, self.ctx.epochs)))
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr_g * scale
        self.student = student_network(side)  # the generator attacks the student network itself
        self.pending_record = self.to_record > 0
        self.g_sum, self.g_count = 0.0, 0
        # the loop merges this dict into the epoch's metrics row *after* the epoch, so filling it in
        # batches() reports this epoch's generator loss and bank size
        self.epoch_logs = {"bank_size": float(self.job.rows("bank"))}
        return self.epoch_logs

    def generator_step(self, n: int) -> float:
        """One Adam step of G maximising the student-teacher L1 discrepancy; returns the discrepancy."""
        assert self.student is not None, "before_epoch() must run first"
        engine = self.ctx.engine
        with frozen(self.student, eval_mode=False), engine.autocast():
            # the generator inside autocast too: it is most of this step's cost (bench_online.py)
            x = engine.images(self.generator(self.noise(n)).float())
            if self.bn is not None:
                self.bn.enable(True)
            t_logits = self.teacher(x)
            s_logits = self.student(x)
            l1 = l1_discrepancy(s_logits, t_logits)
            loss = -torch.log1p(l1) if self.log_loss else -l1
            ctx = Context(x=x, t_logits=t_logits.float(), bn=self.bn)
            if self.ie:
                loss = loss + self.ie * TERMS.get("ie")(ctx)
            if self.bn is not None:
                loss = loss + self.bn_weight * TERMS.get("bn")(ctx)
                self.bn.enable(False)
            check_finite(loss, "dfad generator loss")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(l1.detach())

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless fresh batches; the loop stops after its step limit (one epoch)."""
        no_labels = torch.full((batch_size,), -1, dtype=torch.int64, device=self.device)
        while True:
            t0 = time.perf_counter()
            if self.step % self.student_steps == 0:
                self.g_sum += self.generator_step(batch_size)
                self.g_count += 1
                self.epoch_logs["g_l1"] = self.g_sum / self.g_count
            with torch.no_grad(), self.ctx.engine.autocast():
                x = self.generator(self.noise(batch_size)).float()
            self.seconds += time.perf_counter() - t0
            self.made += batch_size
            if self.pending_record:
                self.pending_record = False
                self.record_sample(x[: self.to_record])
            self.step += 1
            yield x, no_labels

    @torch.no_grad()
    def record_sample(self, x: torch.Tensor) -> None:
        """Record the epoch's sample (every rank's, in rank order, under torchrun: each has its own generator)."""
        engine = self.ctx.engine
        for sample in gather_objects(x.clamp(0, 1).cpu()):
            labels = self.ctx.header.task.predict(self.teacher(engine.images(sample.to(self.device)))).cpu()
            self.record(sample, labels, self.next_round)
        self.next_round += 1
        self.epoch_logs["bank_size"] = float(self.job.rows("bank"))

    def method_state(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(), "step": self.step}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.step = int(state["step"])
