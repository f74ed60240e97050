"""How close `dfkd retrieve`'s relevance estimate comes to the truth, on pools whose relevant share is known.

    python benchmarks/relevance_estimate.py    # after `dvc repro teacher pool` (the default pipeline's)

Scores the default pipeline's wild pool (its ``digits`` source is the relevant one) and mnist5k's 1,000 real
test digits with the pipeline's teacher, once, then estimates the relevant count of mixtures drawn from those
scores (seeded): subsamples of the pool's digits among its photo crops and noise, and real digits among the
offline pool's noise kinds (uniform and smooth; other draws than the stage's own reference noise), as
``dfkd_common.relevance.estimate`` does inside ``dfkd retrieve``. Prints one row per mixture: the true count,
the estimate and the error. Also prints the teacher's confidence (-log p_max) per source, the score DFND ranks
by, to show why it cannot serve the estimate here.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.data import load_split
from dfkd_common.data.offline_pool import noise_images
from dfkd_common.engine import Engine
from dfkd_common.relevance import Relevance, estimate, histogram
from dfkd_common.retrieval import neg_log_pmax, teacher_scores


def score(teacher: torch.nn.Module, rel: Relevance, images: torch.Tensor, engine: Engine) -> tuple[np.ndarray, ...]:
    rels, confs = [], []
    for i in range(0, len(images), 1024):
        logits = teacher_scores(teacher, images[i:i + 1024], engine)
        rels.append(rel.of(logits).float().cpu())
        confs.append(neg_log_pmax(logits).cpu())
    return torch.cat(rels).numpy(), torch.cat(confs).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="artifacts/teachers/lenet5.safetensors")
    ap.add_argument("--pool", default="artifacts/pools/offline.h5")
    args = ap.parse_args()
    engine = Engine.create("cpu", amp=False, channels_last=False)
    teacher, _ = load_model(args.teacher)
    rel = Relevance(teacher)
    pool = load_bank(args.pool)
    names = pool.attrs["source_names"]
    src = pool.extra["source"].long().numpy()
    s_pool, c_pool = score(teacher, rel, pool.images, engine)
    s_real, _ = score(teacher, rel, load_split("mnist5k", "test").images, engine)
    noise = noise_images(4000, 32, 1, np.random.default_rng(11))
    s_noise, _ = score(teacher, rel, noise, engine)
    reference = rel.reference(teacher, 1, 32, engine, seed=0)
    rel.remove()
    print(f"relevance score: {rel.kind}")
    print("| source | relevance score, 10 / 50 / 90 % | -log p_max, 10 / 50 / 90 % |")
    print("| --- | ---: | ---: |")
    for i, name in enumerate(names):
        q = np.percentile(s_pool[src == i], [10, 50, 90])
        c = np.percentile(c_pool[src == i], [10, 50, 90])
        print(f"| {name} | {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} | {c[0]:.3f} / {c[1]:.3f} / {c[2]:.3f} |")
    q = np.percentile(s_real, [10, 50, 90])
    print(f"| mnist5k test (real) | {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} | |")
    rng = np.random.default_rng(0)
    digits = np.flatnonzero(src == names.index("digits"))
    others = np.flatnonzero(src != names.index("digits"))
    half = len(s_noise) // 2
    cases: list[tuple[str, np.ndarray, int]] = [("the default pool", s_pool, len(digits))]
    for n_dig, n_oth in [(500, 24500), (1560, 24440), (3000, 20000)]:
        pick = np.concatenate([rng.choice(digits, n_dig, replace=False), rng.choice(others, n_oth, replace=False)])
        cases.append((f"{n_dig:,} pool digits + {n_oth:,} photo crops / noise", s_pool[pick], n_dig))
    cases.append(("its photo crops and noise only", s_pool[others], 0))
    for share in (0.05, 0.2, 0.5, 0.9):
        k = round(1000 * share) if share < 0.9 else 900
        n = round(k * (1 - share) / share)
        real = s_real[rng.permutation(len(s_real))[:k]]
        for kind, part in (("uniform + smooth", s_noise), ("uniform", s_noise[:half]), ("smooth", s_noise[half:])):
            cases.append((f"{k} real digits + {n} {kind} noise", np.concatenate([real, rng.choice(part, n)]), k))
    cases.append(("1,000 real digits only", s_real, len(s_real)))
    print("\n| pool | relevant | estimated | error |")
    print("| --- | ---: | ---: | ---: |")
    for name, s, truth in cases:
        est = estimate(histogram(s), reference, rel.kind)
        err = f"{100 * (est.count / truth - 1):+.0f} %" if truth else ("exact" if est.count == 0 else "-")
        print(f"| {name} | {truth:,} | {est.count:,} | {err} |")


if __name__ == "__main__":
    main()
