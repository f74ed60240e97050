"""``dfkd augment``'s quality and speed with the offline prior, against a randomly initialised prior of the same shape.

For N source images of a bank it makes k variations with each prior at the same strength and steps, and prints:
throughput (variations/s), the teacher's label agreement between a source and its variation (issue 17: >= 60 %
with the trained prior, <= 30 % with the random one), the cosine similarity of their teacher embeddings, and for a
range of omega the keep rate and the label agreement among the kept (how omega is chosen: docs in the README).

    python benchmarks/bench_augment.py                       # the default pipeline's DeepInversion bank
    python benchmarks/bench_augment.py --bank artifacts/banks/dfnd.h5 --sources 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import dfkd_common  # noqa: F401  (torchvision guard first)
from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.engine import Engine
from dfkd_common.variation.augment import vary_and_score
from dfkd_common.variation.models import open_variation_model
from dfkd_common.variation.prior import random_prior_like

OMEGAS = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


def measure(model_dir: Path, bank_images: torch.Tensor, rows: torch.Tensor, teacher: torch.nn.Module,
            engine: Engine, args: argparse.Namespace) -> dict[str, object]:
    vm = open_variation_model(str(model_dir), engine.device, {"strength": args.strength, "steps": args.steps})
    t0 = time.perf_counter()
    v = vary_and_score(teacher, vm, bank_images[rows], rows.numpy(), args.k, args.seed, engine)
    seconds = time.perf_counter() - t0  # the teacher's two scoring passes included, as in dfkd augment
    cos, same = v.score, v.same
    by_omega = [(w, float((cos >= w).float().mean()), float(same[cos >= w].float().mean()) if (cos >= w).any()
                 else float("nan")) for w in OMEGAS]
    return {"variations_per_s": len(cos) / seconds, "agreement": float(same.float().mean()),
            "cos_mean": float(cos.mean()), "cos_q10": float(cos.quantile(0.1)), "by_omega": by_omega}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=Path, default=Path("artifacts/banks/deepinversion.h5"))
    ap.add_argument("--teacher", type=Path, default=Path("artifacts/teachers/lenet5.safetensors"))
    ap.add_argument("--prior", type=Path, default=Path("priors/offline-pool-32x1"))
    ap.add_argument("--sources", type=int, default=256)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    engine = Engine.create(args.device, amp=False, channels_last=False)
    teacher, _ = load_model(args.teacher, engine.device)
    bank = load_bank(args.bank)
    rows = torch.randperm(len(bank), generator=torch.Generator().manual_seed(args.seed))[: args.sources].sort().values
    print(f"{args.bank}: {len(rows)} sources x k {args.k}, strength {args.strength}, {args.steps} DDIM steps, "
          f"{engine.device}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"trained prior": args.prior, "random-init prior": random_prior_like(args.prior, Path(tmp) / "rnd")}
        for name, path in runs.items():
            r = measure(path, bank.images, rows, teacher, engine, args)
            print(f"{name:>18}: {r['variations_per_s']:.1f} variations/s; teacher label unchanged "
                  f"{100 * r['agreement']:.1f} %; cosine mean {r['cos_mean']:.3f}, 10th percentile {r['cos_q10']:.3f}")
            for w, keep, agree in r["by_omega"]:  # type: ignore[attr-defined]
                print(f"{'':>20}omega {w:.2f}: keep {100 * keep:5.1f} %, "
                      f"label unchanged among kept {100 * agree:5.1f} %")


if __name__ == "__main__":
    main()
