"""Model checkpoints (safetensors + metadata) and resumable training state, never pickles.

A model checkpoint is one ``.safetensors`` file. Its header metadata holds ``dfkd`` -> JSON with the schema
version, architecture name and kwargs, dataset info (classes, input shape, normalisation), measured test
accuracy, the params that produced it, creation time and package version, so :func:`load_model` rebuilds the
model from the file alone. Loading runs no pickled code, so a checkpoint someone sent you is safe to open.

Resumable state (optimizers, schedulers, generator, RNG states, counters) uses the same container through
:func:`save_tree`/:func:`load_tree`: tensors go into safetensors, everything else into JSON metadata. Both are
written atomically (temp name + rename).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dfkd_common.data import DatasetInfo
from dfkd_common.engine import atomic_path
from dfkd_common.errors import DfkdError
from dfkd_common.models import Classifier, build_model

SCHEMA_VERSION = 1


@dataclass
class ModelMeta:
    arch: str
    arch_kwargs: dict[str, Any]
    dataset: DatasetInfo
    accuracy: float | None
    params: dict[str, Any]
    created_at: str
    version: str
    role: str  # teacher | student

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "arch": self.arch,
                "arch_kwargs": self.arch_kwargs,
                "dataset": self.dataset.to_dict(),
                "input_shape": [self.dataset.channels, self.dataset.image_size, self.dataset.image_size],
                "num_classes": self.dataset.num_classes,
                "accuracy": self.accuracy,
                "params": self.params,
                "created_at": self.created_at,
                "version": self.version,
                "role": self.role,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        d = json.loads(text)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise DfkdError(f"checkpoint schema version {d.get('schema_version')} (expected {SCHEMA_VERSION})")
        return cls(
            arch=d["arch"],
            arch_kwargs=d.get("arch_kwargs", {}),
            dataset=DatasetInfo.from_dict(d["dataset"]),
            accuracy=d.get("accuracy"),
            params=d.get("params", {}),
            created_at=d.get("created_at", ""),
            version=d.get("version", ""),
            role=d.get("role", ""),
        )


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_checksum(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (lineage: banks record the checksum of the teacher and parent bank)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(path: str | os.PathLike[str], model: Classifier, meta: ModelMeta) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"dfkd": meta.to_json()})


def read_meta(path: str | os.PathLike[str]) -> ModelMeta:
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbage files
        raise DfkdError(f"{path} is not a readable safetensors checkpoint ({exc})") from None
    if "dfkd" not in md:
        raise DfkdError(f"{path} is a safetensors file without dfkd metadata")
    return ModelMeta.from_json(md["dfkd"])


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Classifier, ModelMeta]:
    """Rebuild a model from its checkpoint alone; eval mode."""
    meta = read_meta(path)
    ds = meta.dataset
    model = build_model(meta.arch, ds.num_classes, ds.channels, ds.mean, ds.std, **meta.arch_kwargs)
    try:
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
        model.load_state_dict(state)
    except Exception as exc:
        raise DfkdError(f"{path}: weights do not load into {meta.arch} ({exc})") from None
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- pickle-free state trees
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, f"{prefix}.k{i}"), _flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a state file")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_tree(path: str | os.PathLike[str], tree: dict[str, Any]) -> None:
    """Atomically store a nested dict of tensors/arrays/python scalars (e.g. resumable training state)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, tensors, "t")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dfkd_tree": json.dumps(skeleton)})


def load_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise DfkdError(f"{path}: unreadable state file ({exc})") from None
    if "dfkd_tree" not in md:
        raise DfkdError(f"{path}: not a dfkd state file")
    return _unflatten(json.loads(md["dfkd_tree"]), tensors)
