"""Compare two runs of a pipeline artifact by artifact: did a refactor change any result?

    python benchmarks/compare_artifacts.py BEFORE/artifacts AFTER/artifacts [--datasets-only]

For every metrics and details file both runs wrote: every figure other than time (keys naming seconds or a rate)
must be equal to the last bit, learning curves included. For every bank (``*.h5``) both wrote: every per-row
dataset (images, labels, rounds, teacher logits, scores, parent rows, sources) must be byte-identical, and every
attribute but those that record when, by which version or how fast it was written. Teachers' and students'
weights are compared tensor by tensor. ``--datasets-only`` leaves out the details files and the banks'
attributes: for runs of two versions whose schemas differ (0.6 against 0.7 added the task). Prints one line per
artifact and exits 1 if anything differs. Run both pipelines on one machine, with one thread count: float results
differ between CPU models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from safetensors import safe_open

#: what records when, by which version or where: created_at, the file checksums of upstream artifacts (which hold
#: their own created_at), and paths, which may differ between two checkouts
WHEN = {"created_at", "version", "bank_out", "teacher_checksum", "parent_checksum", "parent_path"}


def timing(key: str) -> bool:
    return key in WHEN or "seconds" in key or key.endswith("_per_s") or key == "resumed_at"


def figures(x: Any, y: Any, where: str = "") -> list[str]:
    """Differences between two JSON values, keys that record time left out."""
    if isinstance(x, dict) and isinstance(y, dict):
        keys = sorted(k for k in set(x) | set(y) if not timing(k))
        return [d for k in keys for d in figures(x.get(k), y.get(k), f"{where}{k}.")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y, strict=True)) for d in figures(u, v, f"{where}{i}.")]
    return [] if x == y else [f"{where.rstrip('.')}: {x} != {y}"]


def metrics(a: Path, b: Path) -> list[str]:
    return figures(json.loads(a.read_text()), json.loads(b.read_text()))


def bank(a: Path, b: Path, attrs: bool = True) -> list[str]:
    out = []
    with h5py.File(a) as x, h5py.File(b) as y:
        for name in sorted(set(x) | set(y)):
            if name not in x or name not in y:
                out.append(f"dataset {name} only in one run")
            elif not np.array_equal(x[name][()], y[name][()]):
                out.append(f"dataset {name} differs")
        if attrs:
            out += [f"attribute {d}" for d in figures(_attrs(x), _attrs(y))]
    return out


def _attrs(h5: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in h5.attrs.items():
        v = v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
        try:
            out[k] = json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
        except json.JSONDecodeError:
            out[k] = v
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
    ap.add_argument("--datasets-only", action="store_true", help="no details files, no bank attributes")
    args = ap.parse_args()
    checks: dict[str, Callable[[Path, Path], list[str]]] = {
        "*.metrics.json": metrics, "*.h5": partial(bank, attrs=not args.datasets_only), "*.safetensors": weights}
    if not args.datasets_only:
        checks["*.details.json"] = metrics
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
