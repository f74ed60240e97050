"""How far each round of a bank sits from the teacher's BatchNorm running statistics (DeepInversion's loss).

Per round (synthesis round, or epoch of an online run's recorded sample) one teacher forward of that round's
images, and the sum over the teacher's BatchNorm2d inputs of ||batch mean - running mean||_2 + ||batch var -
running var||_2. `--real N` adds the same figure for batches of N real test images of the teacher's dataset, as
a yardstick (the figure depends on the batch size: compare rounds of the same size). docs/RESULTS.md uses it to
show what DFAD's `online.bn` prior changes:

    python benchmarks/bank_bn_distance.py --teacher artifacts/teachers/lenet5.safetensors --real 100 \
        artifacts/banks/dfad.online.h5 artifacts/banks/dfad_priors.online.h5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.data.datasets import load_split
from dfkd_common.models.hooks import BNStats


def distances(teacher: torch.nn.Module, bn: BNStats, batches: list[torch.Tensor]) -> list[float]:
    out = []
    for x in batches:
        with torch.no_grad():
            teacher(to_float(x))
        out.append(float(bn.loss()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("banks", nargs="+", type=Path)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--real", type=int, default=0, help="also measure batches of this many real test images")
    args = ap.parse_args()
    teacher, meta = load_model(args.teacher)
    teacher.eval()
    bn = BNStats(teacher)
    if not len(bn):
        sys.exit("error: the teacher has no BatchNorm2d layers")
    bn.enable(True)
    print(f"command: {sys.executable} {' '.join(sys.argv)}")
    for path in args.banks:
        bank = load_bank(path)
        rounds = torch.as_tensor(bank.rounds)
        images = torch.as_tensor(bank.images)
        batches = [images[rounds == r] for r in torch.unique(rounds).tolist()]
        print(f"{path} (rounds of {len(batches[0])}): " + " ".join(f"{d:.1f}" for d in distances(teacher, bn, batches)))
    if args.real:
        images = load_split(meta.dataset.name, "test").images
        batches = [images[i:i + args.real] for i in range(0, len(images) - args.real + 1, args.real)]
        print(f"real {meta.dataset.name} test images (batches of {args.real}): "
              + " ".join(f"{d:.1f}" for d in distances(teacher, bn, batches)))


if __name__ == "__main__":
    main()
