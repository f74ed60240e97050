"""Model checkpoints (safetensors + metadata) and resumable training state, never pickles.

A model checkpoint is one ``.safetensors`` file. Its header metadata holds ``dfkd`` -> JSON with the schema
version, the artifact's kind (teacher, student; open to others), its task, the model reference and options
(``arch``: a model source and a network, :mod:`dfkd_common.models.sources`), dataset info (classes, input shape
(H, W), normalisation), the task's metrics measured on the real test split, the params that produced it, creation
time and package version, so :func:`load_model` rebuilds the model from the file alone (every field:
``docs/ARTIFACTS.md``). Loading runs no pickled code, so a checkpoint someone sent you is safe to open.
Checkpoints of schema version 1 (dfkd 0.2-0.6: ``accuracy`` and ``role`` instead of ``metrics`` and ``kind``) load
as they are.

Resumable state (optimizers, schedulers, generator, RNG states, counters) uses the same container through
:func:`save_tree`/:func:`load_tree`: tensors go into safetensors, everything else into JSON metadata. Both are
written atomically (temp name + rename).

Integrity: safetensors checks its header, not the tensor bytes, so both containers also record a SHA-256 of every
tensor (name, dtype, shape and bytes) in their metadata, checked on every load: a flipped byte in the weights is
one error line naming the file and the tensor, instead of a silently different model. Checkpoints written before
dfkd 0.2 have no digests: they load, with a note that they cannot be verified.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from dfkd_common.data import DatasetInfo
from dfkd_common.engine import atomic_path
from dfkd_common.errors import DfkdError
from dfkd_common.models import Classifier, build_for, resolve, user_code
from dfkd_common.tasks import Task, get_task

SCHEMA_VERSION = 2
#: versions this dfkd reads: 1 (dfkd 0.2-0.6), 2 (since 0.7: kind, task, metrics, model source)
READABLE = (1, 2)
DIGESTS = "tensors_sha256"  # metadata key: {tensor name: sha256 hex}


class UnverifiedWarning(UserWarning):
    """A checkpoint written before dfkd 0.2 carries no digests: it loads, but corruption would go unnoticed."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (CPU, contiguous)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_digest(v) for k, v in sorted(tensors.items())}


def check_digests(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, str] | None) -> None:
    """Raise :class:`DfkdError` naming the first tensor whose bytes differ from the recorded digest."""
    if expected is None:
        warnings.warn(f"{path} was written before dfkd 0.2, without tensor digests: its content cannot be verified",
                      UnverifiedWarning, stacklevel=3)
        return
    if set(expected) != set(tensors):
        missing = sorted(set(expected) ^ set(tensors))[0]
        raise DfkdError(f"{path}: tensor {missing} is missing or unexpected: the file is damaged")
    for name in sorted(tensors):
        if tensor_digest(tensors[name]) != expected[name]:
            raise DfkdError(f"{path}: tensor {name} does not match its recorded checksum: the file is corrupted")


@dataclass
class ModelMeta:
    """A model artifact's metadata (schema: ``docs/ARTIFACTS.md``).

    ``metrics`` are the task's metrics on the real test split (``{}``: unmeasured). ``kind`` is open: teacher and
    student today, a quantized model later.
    """

    arch: str  # model reference: a zoo name, or source:name (torchvision:resnet18)
    arch_kwargs: dict[str, Any]
    dataset: DatasetInfo
    metrics: dict[str, float]
    params: dict[str, Any]
    created_at: str
    version: str
    kind: str  # teacher | student | ...
    digests: dict[str, str] | None = None  # tensor name -> sha256, filled by save_model; None: written before 0.2
    code: dict[str, str] | None = None  # user code (arch module:Class): its source file and sha256, by save_model
    features: dict[str, Any] | None = None  # feature sites named by module path (penultimate, stages), if any
    input_size: list[int] | None = None  # the network's own input [H, W] where it differs from the data's

    @property
    def task(self) -> Task:
        return get_task(self.dataset.task)

    @property
    def headline(self) -> float | None:
        """The task's headline metric on the real test split (classification: test accuracy), if measured."""
        return self.metrics.get(self.task.headline)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "kind": self.kind,
                "task": self.dataset.task,
                "arch": self.arch,
                "source": resolve(self.arch)[0].name,
                "arch_kwargs": self.arch_kwargs,
                "dataset": self.dataset.to_dict(),
                "input_shape": list(self.dataset.shape),
                "num_classes": self.dataset.num_classes,
                "metrics": self.metrics,
                "params": self.params,
                "created_at": self.created_at,
                "version": self.version,
                DIGESTS: self.digests,
                **({"code": self.code} if self.code else {}),
                **({"features": self.features} if self.features else {}),
                **({"input_size": self.input_size} if self.input_size else {}),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        d = json.loads(text)
        version = d.get("schema_version")
        if version not in READABLE:
            raise DfkdError(f"checkpoint schema version {version}; this dfkd reads versions "
                            f"{', '.join(map(str, READABLE))} (docs/ARTIFACTS.md)")
        dataset = DatasetInfo.from_dict(d["dataset"])
        if version == 1:  # dfkd 0.2-0.6: classification, accuracy and role
            metrics = {} if d.get("accuracy") is None else {"test_acc": float(d["accuracy"])}
            kind = d.get("role", "")
        else:
            metrics, kind = dict(d.get("metrics") or {}), d.get("kind", "")
            if d.get("task", dataset.task) != dataset.task:
                raise DfkdError(f"checkpoint metadata names task {d['task']!r} but its dataset is for "
                                f"{dataset.task!r}: the file is damaged")
        return cls(
            arch=d["arch"],
            arch_kwargs=d.get("arch_kwargs", {}),
            dataset=dataset,
            metrics=metrics,
            params=d.get("params", {}),
            created_at=d.get("created_at", ""),
            version=d.get("version", ""),
            kind=kind,
            digests=d.get(DIGESTS),
            code=d.get("code"),
            features=d.get("features"),
            input_size=d.get("input_size"),
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


def _write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialise in memory, then write with plain file I/O through :func:`atomic_path`: a full disk is then an
    ``OSError`` (one line naming the path) rather than a safetensors-internal error, and never a partial file."""
    data = save(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_model(path: str | os.PathLike[str], model: Classifier, meta: ModelMeta) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = dataclasses.replace(meta, digests=digests(state), code=user_code.code_fingerprint(meta.arch) or meta.code,
                               features=getattr(model, "feature_paths", None) or meta.features,
                               input_size=list(model.input_size) if getattr(model, "input_size", None)
                               else meta.input_size)
    _write(path, state, {"dfkd": meta.to_json()})


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
    # user code: only if trusted (one line if not)
    model = build_for(meta.arch, meta.dataset, meta.arch_kwargs, meta.features, meta.input_size)
    user_code.check_fingerprint(meta.arch, meta.code, str(path))
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise DfkdError(f"{path}: weights are unreadable ({exc})") from None
    check_digests(Path(path), state, meta.digests)
    try:
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
    _write(path, tensors, {"dfkd_tree": json.dumps(skeleton), DIGESTS: json.dumps(digests(tensors))})


def load_tree_scalars(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A flat tree's one-value-per-row entries (a job shard's rounds, labels, indices: not its images, logits or
    masks), each verified; nothing else is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            skeleton = json.loads(md["dfkd_tree"])
            wanted = [(k, v) for k, v in skeleton["__dict__"] if isinstance(v, dict) and "__tensor__" in v
                      and len(f.get_slice(v["__tensor__"]).get_shape()) == 1]
            tensors = {v["__tensor__"]: f.get_tensor(v["__tensor__"]) for _, v in wanted}
    except Exception as exc:
        raise DfkdError(f"{path}: unreadable state file ({exc})") from None
    expected = json.loads(md[DIGESTS]) if DIGESTS in md else None
    check_digests(Path(path), tensors, {k: expected[k] for k in tensors} if expected is not None else None)
    return {k: tensors[v["__tensor__"]].numpy() for k, v in wanted}


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
    check_digests(Path(path), tensors, json.loads(md[DIGESTS]) if DIGESTS in md else None)
    return _unflatten(json.loads(md["dfkd_tree"]), tensors)
