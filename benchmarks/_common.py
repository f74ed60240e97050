"""What the benchmark scripts share (they run as ``python benchmarks/<script>.py``, so this imports as ``_common``)."""

from __future__ import annotations

from pathlib import Path

from dfkd_common import __version__
from dfkd_common.checkpoint import ModelMeta, now, save_model
from dfkd_common.data import get_dataset
from dfkd_common.models import build_model


def teacher_or_untrained(path: Path | None, tmp: Path) -> Path:
    """``path`` if that checkpoint exists, else an untrained LeNet-5 saved under ``tmp``.

    Throughput does not depend on the weights, so every benchmark runs before `dvc repro teacher` too.
    """
    if path is not None and path.exists():
        return path
    info = get_dataset("mnist5k").info
    out = tmp / "lenet5.safetensors"
    save_model(out, build_model("lenet5", 10, 1, info.mean, info.std),
               ModelMeta("lenet5", {}, info, None, {}, now(), __version__, "teacher"))
    return out
