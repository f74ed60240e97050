"""What the benchmark scripts share (they run as ``python benchmarks/<script>.py``, so this imports as ``_common``)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from dfkd_common import __version__
from dfkd_common.checkpoint import ModelMeta, now, save_model
from dfkd_common.data import get_dataset
from dfkd_common.models import build_model

ROOT = Path(__file__).resolve().parents[1]  # the repository: params.yaml, artifacts/
DFKD = [sys.executable, "-m", "stages.cli"]  # the CLI, run as the pipeline runs it


def machine() -> str:
    """The machine class every figure depends on: CPU model, cores, native bf16, torch and its threads."""
    import os
    import platform

    import torch

    from dfkd_common.engine import native_bf16

    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def spread(values: list[float]) -> str:
    """``mean M % sd S`` of per-seed accuracies (sd 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {statistics.mean(values):.2f} % sd {sd:.2f}"


def teacher_or_untrained(path: Path | None, tmp: Path) -> Path:
    """``path`` if that checkpoint exists, else an untrained LeNet-5 saved under ``tmp``.

    Throughput does not depend on the weights, so every benchmark runs before `dvc repro teacher` too.
    """
    if path is not None and path.exists():
        return path
    info = get_dataset("mnist5k").info
    out = tmp / "lenet5.safetensors"
    save_model(out, build_model("lenet5", 10, 1, info.mean, info.std),
               ModelMeta("lenet5", {}, info, {}, {}, now(), __version__, "teacher"))
    return out
