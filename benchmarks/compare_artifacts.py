"""Compare two runs of a pipeline artifact by artifact: did a refactor change any result?

    python benchmarks/compare_artifacts.py BEFORE/artifacts AFTER/artifacts

For every metrics file both runs wrote: the headline figures other than time (``test_acc``, ``x_teacher``,
``images``) must be equal to the last bit. For every bank (``*.h5``) both wrote: every per-row dataset (images,
labels, rounds, teacher logits, scores, parent rows, sources) must be byte-identical; attributes that record
when, by which version or how fast are not compared. Students' weights are compared tensor by tensor. Prints one
line per artifact and exits 1 if anything differs. Run both pipelines on one machine, with one thread count:
float results differ between CPU models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
from safetensors import safe_open

TIMING = {"seconds", "images_per_s"}


def metrics(a: Path, b: Path) -> list[str]:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    keys = sorted((set(x) | set(y)) - TIMING)
    return [f"{k}: {x.get(k)} != {y.get(k)}" for k in keys if x.get(k) != y.get(k)]


def bank(a: Path, b: Path) -> list[str]:
    out = []
    with h5py.File(a) as x, h5py.File(b) as y:
        names = sorted(set(x) | set(y))
        for name in names:
            if name not in x or name not in y:
                out.append(f"dataset {name} only in one run")
            elif not np.array_equal(x[name][()], y[name][()]):
                out.append(f"dataset {name} differs")
    return out


def weights(a: Path, b: Path) -> list[str]:
    with safe_open(str(a), "pt") as x, safe_open(str(b), "pt") as y:
        kx, ky = set(x.keys()), set(y.keys())
        if kx != ky:
            return [f"tensors differ: {sorted(kx ^ ky)}"]
        return [f"tensor {k} differs" for k in sorted(kx) if not bool((x.get_tensor(k) == y.get_tensor(k)).all())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    checks = {"*.metrics.json": metrics, "*.h5": bank, "*.safetensors": weights}
    bad = seen = 0
    for pattern, check in checks.items():
        for a in sorted(args.before.rglob(pattern)):
            b = args.after / a.relative_to(args.before)
            if not b.is_file():
                print(f"{a.relative_to(args.before)}: missing in {args.after}")
                bad += 1
                continue
            seen += 1
            problems = check(a, b)
            bad += bool(problems)
            print(f"{a.relative_to(args.before)}: {'; '.join(problems) if problems else 'identical'}")
    print(f"{seen} artifacts compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
