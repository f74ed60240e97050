"""How many of a wild pool's images are relevant to the teacher: an estimate from the scores themselves.

DFND keeps a fixed number of the pool's images; a user cannot know how many are worth keeping. ``dfkd retrieve``
scores every image twice: the paper's confidence (-log p_max, which ranks them) and a relevance score, and
estimates from the relevance scores' distribution how many images belong to the teacher's world.

**The relevance score.** With BatchNorm layers, :class:`~dfkd_common.models.hooks.BNTypicality`: how far each
image's own feature statistics lie from the BN running statistics (DeepInversion's prior, per image). Measured
on the default pipeline's LeNet-5 and pool (docs/RESULTS.md, "DFND on pools it was not tuned on"): the teacher's
confidence does not tell noise (median -log p_max 0.00) from digits (0.07), the BN score does (digits 1.3,
noise 5, photo crops 6-28, real MNIST 1.5). Without BN layers (or through a TorchScript program) the estimate
falls back to the confidence, and says so.

**The estimate** works on the histogram of log(score) (streamed over the pool shard by shard: O(bins) memory):

1. The stage makes its own certainly irrelevant images (uniform and smooth noise, the offline pool's kinds)
   and scores them: the reference.
2. The relevant images form the lowest mode of the (smoothed) density. A mode counts if it stands out (its
   valley to the next mode is at most half its height) and holds a few rows. No such mode, or one no lower than
   the reference's 1 % quantile: no relevant images (the pool looks no more like the teacher's data than noise).
3. A two-component Gaussian mixture (in log score) is fitted to the rows below the reference's lower quartile,
   started at that mode and at the quartile; the rows whose posterior favours the lower component, below the
   quartile, are the relevant ones: their number is the estimate and their bound the selection's ``cut``.

Checked on pools whose relevant share is known (tests/retrieval/test_relevance.py, and the docs' table): within
20 % from 5 % to 90 % relevant. It is a heuristic with named failure modes: a pool whose irrelevant images are
as typical as the relevant ones (smooth noise next to real digits at 20 %) is where it errs most.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dfkd_common.augment_ops import to_float
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import BNTypicality

LO, HI, STEP = -16.0, 16.0, 0.02  # the histogram's grid over the natural log of the score
BINS = round((HI - LO) / STEP)
BANDWIDTH = 0.1  # Gaussian smoothing of the density, in log score
PROMINENCE = 0.35  # a mode's valley to the next one is at most (1 - this) x its height
REFERENCE_IMAGES = 512


def bin_of(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each score (one definition for the histogram and for the selection)."""
    z = np.log(np.clip(np.asarray(scores, dtype=np.float64), 1e-30, None))
    return np.clip(np.floor((z - LO) / STEP), 0, BINS - 1).astype(np.int64)


def histogram(scores: np.ndarray) -> np.ndarray:
    """Counts per bin of finite scores (unreadable rows carry inf and are left out)."""
    s = np.asarray(scores)
    return np.bincount(bin_of(s[np.isfinite(s)]), minlength=BINS)


def _centre(b: int | np.ndarray) -> Any:
    return LO + (np.asarray(b) + 0.5) * STEP


def _smooth(h: np.ndarray, bandwidth: float = BANDWIDTH) -> np.ndarray:
    sd = bandwidth / STEP
    k = np.arange(-int(4 * sd), int(4 * sd) + 1)
    kernel = np.exp(-0.5 * (k / sd) ** 2)
    return np.convolve(h.astype(np.float64), kernel / kernel.sum(), mode="same")


def bandwidth(n: int) -> float:
    """Smoothing in log score: wider where few rows are, so a small sample's bumps are not modes."""
    return max(BANDWIDTH, 0.6 * max(n, 1) ** -0.2)


def modes(h: np.ndarray) -> list[int]:
    """Bins of the smoothed density's prominent modes, low scores first."""
    bw = bandwidth(int(h.sum()))
    f = _smooth(h, bw)
    need = max(10.0, 0.001 * h.sum()) / (2.5 * bw / STEP)  # height of a mode holding ~that many rows
    padded = np.concatenate([[0.0], f, [0.0]])
    peaks = np.flatnonzero((padded[1:-1] > padded[:-2]) & (padded[1:-1] >= padded[2:]) & (f > 0))
    out = []
    for p in peaks:
        left = p
        while left > 0 and f[left - 1] <= f[p]:
            left -= 1
        right = p
        while right < len(f) - 1 and f[right + 1] <= f[p]:
            right += 1
        base = max(f[left:p + 1].min(), f[p:right + 1].min())
        if f[p] - base >= PROMINENCE * f[p] and f[p] >= need:
            out.append(int(p))
    return out


def _gauss_loglik(x: np.ndarray, mu: np.ndarray, sd: np.ndarray, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: the mixture's log density and each component's posterior."""
    logd = np.log(pi)[:, None] - 0.5 * ((x[None] - mu[:, None]) / sd[:, None]) ** 2 - np.log(sd)[:, None]
    top = logd.max(0)
    total = top + np.log(np.exp(logd - top).sum(0))
    return total - 0.5 * np.log(2 * np.pi), np.exp(logd - total)


def _mixture(x: np.ndarray, w: np.ndarray, means: tuple[float, float], iters: int = 300) -> np.ndarray | None:
    """Weighted EM for a 1-D mixture of two Gaussians on bin centres ``x`` with counts ``w`` (scikit-learn's
    mixture takes no sample weights). Returns the first component's posterior per bin, or None where one
    Gaussian explains the rows as well (BIC): then every row is of one kind."""
    floor = STEP / 2
    n = w.sum()
    mu1 = np.array([(w * x).sum() / n])
    sd1 = np.array([max(np.sqrt((w * (x - mu1[0]) ** 2).sum() / n), floor)])
    ll1 = (w * _gauss_loglik(x, mu1, sd1, np.ones(1))[0]).sum()
    mu = np.array(means, dtype=np.float64)
    sd = np.full(2, max(sd1[0] / 2, floor))
    pi = np.array([0.5, 0.5])
    for _ in range(iters):
        _, post = _gauss_loglik(x, mu, sd, pi)
        nk = (post * w).sum(1) + 1e-12
        mu = (post * w * x).sum(1) / nk
        sd = np.sqrt(np.maximum((post * w * (x - mu[:, None]) ** 2).sum(1) / nk, floor**2))
        pi = np.maximum(nk / nk.sum(), 1e-12)
    ll2, post = _gauss_loglik(x, mu, sd, pi)
    if -2 * (w * ll2).sum() + 5 * np.log(n) >= -2 * ll1 + 2 * np.log(n):
        return None
    return post[int(np.argmin(mu))]


@dataclass(frozen=True)
class RelevanceEstimate:
    """The estimate ``dfkd retrieve`` prints and records; rows whose score's bin is below ``cut_bin`` are the
    relevant ones (``--select auto`` keeps those)."""

    score: str  # "bn" (BN typicality) or "confidence" (-log p_max)
    count: int
    share: float
    cut_bin: int  # 0: none relevant
    cut: float | None  # the score below which a row counts as relevant
    mode: float | None  # the relevant mode's score
    reference_q01: float  # the stage's own noise: 1 % quantile of its scores
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(h: np.ndarray, reference: np.ndarray, score: str) -> RelevanceEstimate:
    """The relevant count from the pool's histogram ``h`` and the reference noise's scores (see the module)."""
    n = int(h.sum())
    ref = np.log(np.clip(np.asarray(reference, dtype=np.float64), 1e-30, None))
    q01, q25 = float(np.quantile(ref, 0.01)), float(np.quantile(ref, 0.25))

    def none(reason: str, mode: float | None = None) -> RelevanceEstimate:
        return RelevanceEstimate(score, 0, 0.0, 0, None, mode, math.exp(q01), reason)

    found = modes(h)
    if not found:
        return none("no mode stands out in the scores")
    p0 = found[0]
    if _centre(p0) >= q01:
        return none(f"the lowest mode (score {math.exp(_centre(p0)):.3g}) is no lower than the stage's own noise "
                    f"(1 % of it below {math.exp(q01):.3g})", math.exp(_centre(p0)))
    top = int(min(BINS, max(p0 + 1, np.floor((q25 - LO) / STEP))))
    x, w = _centre(np.arange(top)), h[:top].astype(np.float64)
    low = np.flatnonzero(np.cumsum(h[:top]) >= h[: int(np.floor((q01 - LO) / STEP))].sum() / 2)
    # does the density climb again before the quartile (others mixed in)? Smoothed more where few rows are, so a
    # small sample's bumps do not count
    f = _smooth(h, bandwidth(int(w.sum())))[p0:top]
    rising = len(f) > 1 and f[-1] > 1.2 * f.min()
    post = _mixture(x, w, (float(_centre(low[0] if len(low) else p0)), q25)) if rising else None
    above = np.flatnonzero((post < 0.5) & (np.arange(top) > p0)) if post is not None else np.zeros(0, np.int64)
    cut_bin = int(above[0]) if len(above) else top
    count = int(h[:cut_bin].sum())
    return RelevanceEstimate(score, count, count / max(n, 1), cut_bin, math.exp(LO + cut_bin * STEP),
                             math.exp(_centre(p0)), math.exp(q01),
                             f"a mode at score {math.exp(_centre(p0)):.3g}, below the stage's own noise")


class Relevance:
    """Scores images by relevance while the teacher scores them: BN typicality where the teacher has BN layers
    its hooks reach, else the confidence. Use :meth:`of` right after a teacher forward of those images."""

    def __init__(self, teacher: Classifier, kind: str = "auto") -> None:
        self.hooks: BNTypicality | None = None
        if kind in ("auto", "bn") and not isinstance(teacher, torch.jit.ScriptModule):
            hooks = BNTypicality(teacher)
            if len(hooks):
                self.hooks = hooks
            else:
                hooks.remove()
        if kind == "bn" and self.hooks is None:
            raise DfkdError("retrieve: relevance 'bn' needs a teacher with BatchNorm2d layers (use 'confidence')")
        self.kind = "bn" if self.hooks is not None else "confidence"

    def of(self, logits: torch.Tensor) -> torch.Tensor:
        """The relevance of the images whose ``logits`` the teacher just made (lower: more relevant)."""
        if self.hooks is not None:
            assert self.hooks.scores is not None
            s, self.hooks.scores = self.hooks.scores, None
            return s
        return torch.logsumexp(logits, 1) - logits.max(1).values

    @torch.no_grad()
    def reference(self, teacher: Classifier, channels: int, image_size: Any, engine: Engine,
                  seed: int) -> np.ndarray:
        """Scores of the stage's own noise images (certainly irrelevant), drawn from ``seed``."""
        from dfkd_common.data.offline_pool import noise_images
        images = noise_images(REFERENCE_IMAGES, image_size, channels, np.random.default_rng(seed))
        out = []
        for i in range(0, len(images), 128):
            x = engine.images(to_float(images[i:i + 128].to(engine.device)))
            with engine.autocast():
                logits = teacher(x).float()
            out.append(self.of(logits).float().cpu())
        return torch.cat(out).numpy()

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
