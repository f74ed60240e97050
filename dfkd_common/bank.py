"""ImageBank: the HDF5 artifact every image-producing stage writes and every student stage reads.

The schema (version 2; every field, attribute and version is described once, in ``docs/ARTIFACTS.md``): one file
per bank with ``images`` uint8 (N, C, H, W), ``round``, the task's target column (classification: ``labels``
int64 (N,), -1 where a row has none) and optional columns (the teacher's logits, whose per-row shape is the task's;
``parent_index``, ``score``, ``source``), plus provenance attributes. Which columns a bank has and their shapes
come from its task (:mod:`dfkd_common.tasks`), never from an assumption about classes. Version-1 banks (dfkd
0.2-0.6: classification, square images) read as they are.

Images are stored unnormalised so any HDF5 viewer shows them; models normalise their own input. Chunks (about
1 MiB of images each) are uncompressed because random reads from gzip chunks are slow. Training reads a bank
that fits in memory whole (50k RGB 32x32 = 147 MiB); a larger one streams in chunk-aligned blocks
(:mod:`dfkd_common.bank_stream`). Writing takes one shard in memory at a time, whatever the bank's size.

Integrity: every dataset carries HDF5's own Fletcher-32 checksum filter, one checksum per chunk, which the HDF5
library verifies on every read. A flipped byte therefore fails the read of its chunk, and :func:`load_bank` turns
that into one error line naming the file and the dataset, instead of training on corrupted pixels.
:func:`verify_bank` (``dfkd bank verify``) reads every chunk on demand. Banks written before dfkd 0.2 have no
checksums: they still open, with a note that they cannot be verified.

Writing is atomic: :meth:`BankHeader.write` assembles the whole file and renames it into place, so an
interrupted stage leaves the target untouched (an old good bank survives a failed re-run). Resumable, long runs
keep their rows in a job's work directory until then (:mod:`dfkd_common.jobs`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from dfkd_common import __version__
from dfkd_common.checkpoint import now
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import atomic_path
from dfkd_common.errors import DfkdError, first_line
from dfkd_common.geometry import Size, as_hw, shape_str
from dfkd_common.tasks import Column, Task, get_task

SCHEMA_VERSION = 2
#: versions this dfkd reads: 1 (dfkd 0.2-0.6), 2 (since 0.7: the task attribute, (H, W) geometry)
READABLE = (1, 2)
KINDS = ("synthetic", "retrieved", "augmented", "merged", "real")
#: the optional per-row columns every task shares; ``teacher_logits`` is optional too, its shape the task's
OPTIONAL = {
    "teacher_logits": np.float16,
    "parent_index": np.int64,
    "score": np.float32,
    "source": np.int16,
}


def logit_columns(task: str, record: bool | None) -> tuple[str, ...]:
    """``("teacher_logits",)`` where a synthesized bank records its teacher's logits: as asked (``record``), else
    the task's default (classification yes; segmentation no, its per-pixel logits are only on request)."""
    return ("teacher_logits",) if (get_task(task).logits_by_default if record is None else record) else ()


class UnverifiedWarning(UserWarning):
    """An artifact written before dfkd 0.2 carries no checksums: it opens, but corruption would go unnoticed."""


def _create(h5: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]) -> None:
    """A resizable dataset with a Fletcher-32 checksum per chunk (verified by HDF5 on every read)."""
    h5.create_dataset(name, shape, dtype, maxshape=(None, *shape[1:]), chunks=chunks, fletcher32=True)


def checksummed(h5: h5py.File) -> bool:
    """Whether every dataset of the bank carries per-chunk checksums."""
    return all(getattr(h5[name], "fletcher32", False) for name in h5)


@dataclass
class BankHeader:
    """What a bank is (shape, kind, provenance) and how its rows are written: the schema above, in one place.

    :meth:`columns` turns a batch into validated schema columns (a shard); :meth:`write` writes shards into a
    bank file atomically, one shard in memory at a time; :mod:`dfkd_common.jobs` streams them from disk into it.
    """

    channels: int
    image_size: Size
    kind: str
    method: str
    dataset: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    teacher_checksum: str = ""
    parent_checksum: str = ""
    optional: tuple[str, ...] = ()
    num_classes: int | None = None
    source_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.image_size = as_hw(self.image_size)
        if self.kind not in KINDS:
            raise ValueError(f"bank kind must be one of {KINDS}")
        for name in self.optional:
            if name not in OPTIONAL:
                raise ValueError(f"unknown optional bank field {name!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    @property
    def classes(self) -> int:
        return self.num_classes if self.num_classes is not None else int(self.dataset["num_classes"])

    @property
    def task(self) -> Task:
        return get_task(self.dataset.get("task"))

    def schema(self) -> dict[str, Column]:
        """Every per-row column this bank holds besides ``images``: its dtype and row shape (from the task)."""
        task = self.task
        cols = {task.target: task.target_column(self.classes, self.image_size), "round": Column(np.int32)}
        for name in self.optional:
            cols[name] = (task.logits_column(self.classes, self.image_size) if name == "teacher_logits"
                          else Column(OPTIONAL[name]))
        return cols

    def columns(self, images: torch.Tensor | np.ndarray, labels: Any, round_index: int | Any,
                **optional: Any) -> dict[str, np.ndarray]:
        """A batch as schema columns. ``images`` uint8 (B,C,H,W) or float in [0, 1] (quantised here)."""
        imgs = to_uint8(images)
        b = imgs.shape[0]
        if tuple(imgs.shape[1:]) != self.shape:
            raise DfkdError(f"bank image shape is {self.shape}, got {tuple(imgs.shape[1:])}")
        missing = set(self.optional) - set(optional)
        if missing:
            raise ValueError(f"rows need {sorted(missing)} for this bank")
        given = {self.task.target: labels, "round": round_index, **optional}
        return {"images": imgs, **{name: _np(given[name], col.dtype, b) for name, col in self.schema().items()}}

    def attrs(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "task": self.task.name, "kind": self.kind, "method": self.method,
                "params": json.dumps(self.params or {}, sort_keys=True, default=str),
                "dataset": json.dumps(self.dataset), "seed": self.seed, "teacher_checksum": self.teacher_checksum,
                "parent_checksum": self.parent_checksum, "created_at": now(), "version": __version__,
                "source_names": json.dumps(self.source_names or [])}

    def write(self, path: str | os.PathLike[str], shards: Iterable[dict[str, np.ndarray]],
              attrs: dict[str, Any] | None = None) -> int:
        """Write ``shards`` (from :meth:`columns`) as the bank ``path``, atomically; returns its rows.

        Memory does not grow with the bank: each shard goes to disk as it comes (HDF5 keeps one chunk cache per
        dataset). HDF5 writes through :class:`_GuardedFile`, which turns a failed write (a full disk) into an
        ``OSError`` raised here after HDF5 has closed cleanly, so the temporary file is removed and the target
        left as it was, instead of HDF5 failing mid-write (after which h5py crashes the interpreter at exit).
        """
        rows = max(1, (1 << 20) // int(np.prod(self.shape)))
        schema = self.schema()
        with atomic_path(path) as tmp:
            sink = _GuardedFile(tmp)
            n = 0
            try:
                with h5py.File(sink, "w") as h5:
                    _create(h5, "images", (0, *self.shape), np.uint8, (rows, *self.shape))
                    for name, col in schema.items():
                        _create(h5, name, (0, *col.shape), col.dtype, (col.chunk_rows(), *col.shape))
                    for shard in shards:
                        b = int(shard["images"].shape[0])
                        for name in ("images", *schema):
                            ds = h5[name]
                            ds.resize(n + b, axis=0)
                            ds[n : n + b] = shard[name]
                        n += b
                        if sink.error is not None:
                            break
                    for key, value in {**self.attrs(), **(attrs or {})}.items():
                        h5.attrs[key] = value if isinstance(value, (int, float, str, np.integer, np.floating)) \
                            else json.dumps(value, default=str)
            except OSError:
                if sink.error is None:
                    raise
            finally:
                sink.close()
            if sink.error is not None:
                raise sink.error  # atomic_path: one line naming the bank, the temporary file removed
        return n


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes a bank through: the first failed OS write is kept, later writes are dropped.

    HDF5 itself then never sees a failure, closes normally, and :meth:`BankHeader.write` raises the kept error
    (the partial file is discarded). Reads return what the file holds, zeros past its end (a region a dropped
    write should have filled): the file is garbage from the first failure on anyway.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.file = open(path, "r+b", buffering=0)  # closed in close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = self.file.readinto(view) or 0
        if got < len(view):  # past the end, or a region a dropped write should have filled: zeros
            view[got:] = bytes(len(view) - got)
        return len(view)

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            view, done = memoryview(data).cast("B"), 0
            try:
                while done < size:  # a regular file may take part of a write (the last space on a disk)
                    written = self.file.write(view[done:])
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += written
                return size
            except OSError as exc:
                self.error = exc
                self.file.seek(size - done, 1)
                return size
        self.file.seek(size, 1)
        return size

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as exc:
                self.error = exc
        return size if size is not None else self.file.tell()

    def flush(self) -> None:
        return None

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        super().close()


class BankWriter:
    """Collect rows in memory, then write the bank atomically on :meth:`close` (small banks, tests, tools).

    Stages that make rows over a long run use :class:`dfkd_common.jobs.Job`, which keeps them on disk between
    checkpoints and resumes; this is the same header and file format without the job.
    """

    def __init__(self, path: str | os.PathLike[str], **header: Any) -> None:
        self.path = Path(path)
        self.header = BankHeader(**header)
        self.parts: list[dict[str, np.ndarray]] = []
        self.extra_attrs: dict[str, Any] = {}

    def __len__(self) -> int:
        return sum(int(p["images"].shape[0]) for p in self.parts)

    def append(self, images: torch.Tensor | np.ndarray, labels: Any, round_index: int | Any, **optional: Any) -> None:
        self.parts.append(self.header.columns(images, labels, round_index, **optional))

    def set_attr(self, key: str, value: Any) -> None:
        self.extra_attrs[key] = value

    def close(self) -> None:
        self.header.write(self.path, self.parts, self.extra_attrs)

    def abort(self) -> None:
        self.parts.clear()

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return images.cpu().contiguous().numpy()
    if images.dtype != np.uint8:
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return images


def _np(value: Any, dtype: Any, n: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy() if value.dtype == torch.bfloat16 else value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=dtype)
    if arr.shape[0] != n:
        raise ValueError(f"column has {arr.shape[0]} rows, images have {n}")
    return arr


@dataclass
class Bank:
    """A bank read whole into memory, validated against the schema."""

    path: Path
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    rounds: torch.Tensor  # int32 (N,)
    extra: dict[str, torch.Tensor]
    attrs: dict[str, Any]
    checksummed: bool = True  # False: written before dfkd 0.2, content not verifiable
    #: True when :func:`load_bank` left the images on disk (``images=False``): ``images`` is then a placeholder
    #: of the right shape (no memory) and :meth:`read_images` reads rows from the file
    on_disk: bool = False

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read_images(self, rows: Any) -> torch.Tensor:
        """The images of ``rows`` (indices, in the order given), from memory or, when on disk, from the file."""
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not self.on_disk:
            return self.images[torch.from_numpy(index)]
        unique, inverse = np.unique(index, return_inverse=True)
        with _open(self.path) as h5:
            got = _read(h5, "images", unique.tolist(), self.path) if len(unique) else \
                np.zeros((0, *self.image_shape), np.uint8)
        return torch.from_numpy(got[inverse])

    def image_blocks(self, block: int = 4096, block_bytes: int = 64 << 20) -> Iterable[torch.Tensor]:
        """Every image in order, at most ``block`` rows and ``block_bytes`` at a time: bounded memory."""
        step = max(1, min(block, block_bytes // max(1, int(np.prod(self.image_shape)))))
        if not self.on_disk:
            yield from (self.images[i : i + step] for i in range(0, len(self), step))
            return
        with _open(self.path) as h5:
            for i in range(0, len(self), step):
                yield torch.from_numpy(_read(h5, "images", slice(i, i + step), self.path))

    @property
    def dataset(self) -> dict[str, Any]:
        return dict(self.attrs.get("dataset") or {})

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def task(self) -> Task:
        return get_task(self.attrs.get("task") or self.dataset.get("task"))

    def check_compatible(self, info: DatasetInfo, what: str = "teacher") -> None:
        """Fail clearly when a bank cannot feed a model of ``info``'s task, input shape and class count."""
        compatible(self.path, self.task, self.image_shape, self.dataset, info, what)
        self.task.check_targets(self.labels, info.num_classes, f"bank {self.path.name}")


def compatible(path: Path, task: Task, image_shape: tuple[int, int, int], dataset: dict[str, Any],
               info: DatasetInfo, what: str) -> None:
    """A bank's task, image shape and class count against a model's (one error line naming both)."""
    if task.name != info.task:
        raise DfkdError(f"bank {path.name} holds {task.name} targets, the {what} is for {info.task}")
    c, h, w = image_shape
    if (c, h, w) != info.shape:
        raise DfkdError(f"bank {path.name} has images {shape_str(c, (h, w))}, the {what} expects "
                        f"{shape_str(info.channels, info.image_size)}")
    k = dataset.get("num_classes")
    if k is not None and int(k) != info.num_classes:
        raise DfkdError(f"bank {path.name} is for {k} classes, the {what} has {info.num_classes}")


def concat_banks(banks: list[Bank]) -> Bank:
    """Several banks as one training set, in the order given (``dfkd distill --bank A --bank B``).

    The images must have one shape; optional columns are kept where every bank has them; attributes are the
    first bank's, plus ``merged_from`` (paths), so a student's provenance names every bank it saw.
    """
    if len(banks) == 1:
        return banks[0]
    shapes = {b.image_shape for b in banks}
    if len(shapes) != 1:
        raise DfkdError("banks to train on together must have one image shape, got "
                        + ", ".join(f"{b.path.name} {shape_str(b.image_shape[0], b.image_shape[1:])}"
                                    for b in banks))
    common = set.intersection(*(set(b.extra) for b in banks))
    return Bank(banks[0].path, torch.cat([b.images for b in banks]), torch.cat([b.labels for b in banks]),
                torch.cat([b.rounds for b in banks]), {k: torch.cat([b.extra[k] for b in banks]) for k in common},
                {**banks[0].attrs, "merged_from": [str(b.path) for b in banks]}, all(b.checksummed for b in banks))


def _open(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"bank not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DfkdError(f"{path} is not a readable HDF5 bank (truncated or wrong format: {exc})") from None


def read_attrs(h5: h5py.File, path: Path) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for k, v in h5.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if k in ("params", "dataset", "source_names", "augment") and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise DfkdError(f"{path}: attribute {k} is not valid JSON") from None
        attrs[k] = v.item() if isinstance(v, np.generic) else v
    version = attrs.get("schema_version")
    if version not in READABLE:
        raise DfkdError(f"{path}: bank schema version {version}; this dfkd ({__version__}) reads versions "
                        f"{', '.join(map(str, READABLE))} (docs/ARTIFACTS.md)")
    attrs.setdefault("task", (attrs.get("dataset") or {}).get("task") or "classification")
    return attrs


def validate(h5: h5py.File, path: Path, target: str = "labels") -> int:
    for name in ("images", target, "round"):
        if name not in h5:
            raise DfkdError(f"{path}: bank has no '{name}' dataset")
    images = h5["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DfkdError(f"{path}: 'images' must be uint8 (N, C, H, W), is {images.dtype} {images.shape}")
    n = images.shape[0]
    for name in (target, "round", *OPTIONAL):
        if name in h5 and h5[name].shape[0] != n:
            raise DfkdError(f"{path}: '{name}' has {h5[name].shape[0]} rows, 'images' has {n}")
    return n


def bank_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes and shapes without reading the images."""
    path = Path(path)
    with _open(path) as h5:
        attrs = read_attrs(h5, path)
        n = validate(h5, path, get_task(attrs["task"]).target)
        return {"attrs": attrs, "n": n, "image_shape": tuple(h5["images"].shape[1:]),
                "fields": sorted(h5.keys()), "checksummed": checksummed(h5)}


def _read(h5: h5py.File, name: str, sel: Any, path: Path) -> np.ndarray:
    """One dataset (or a slice); a failed read is one line naming the file and the dataset."""
    try:
        return h5[name][sel]
    except OSError as exc:
        if getattr(h5[name], "fletcher32", False):
            raise DfkdError(f"{path}: dataset '{name}' fails its checksum: the file is corrupted "
                            f"(HDF5: {first_line(exc)})") from None
        raise DfkdError(f"{path}: dataset '{name}' is unreadable (truncated file? {first_line(exc)})") from None


def note_unverified(path: Path) -> None:
    warnings.warn(f"{path} was written before dfkd 0.2, without checksums: its content cannot be verified",
                  UnverifiedWarning, stacklevel=3)


def load_bank(path: str | os.PathLike[str], rows: slice | None = None, images: bool = True) -> Bank:
    """Read a whole bank (or a slice of it) into memory after validating it; checksums are verified on read.

    ``images=False`` reads every column but the images (inspecting a bank larger than memory: labels, rounds and
    logits are a few bytes a row); :meth:`Bank.read_images` then reads the rows asked for."""
    path = Path(path)
    sel = rows if rows is not None else slice(None)
    with _open(path) as h5:
        attrs = read_attrs(h5, path)
        target = get_task(attrs["task"]).target
        validate(h5, path, target)
        verified = checksummed(h5)
        if not verified:
            note_unverified(path)
        if images:
            pixels = torch.from_numpy(_read(h5, "images", sel, path))
        else:  # no memory: a view of one zero row with the bank's shape
            n = len(range(*sel.indices(h5["images"].shape[0])))
            pixels = torch.zeros(1, *h5["images"].shape[1:], dtype=torch.uint8).expand(n, *h5["images"].shape[1:])
            if rows is not None:
                raise ValueError("load_bank(images=False) reads whole banks only")
        labels = torch.from_numpy(_read(h5, target, sel, path).astype(np.int64))
        rounds = torch.from_numpy(_read(h5, "round", sel, path).astype(np.int32))
        extra = {k: torch.from_numpy(_read(h5, k, sel, path)) for k in OPTIONAL if k in h5}
    return Bank(path, pixels, labels, rounds, extra, attrs, verified, on_disk=not images)


def verify_bank(path: str | os.PathLike[str], block: int = 8192, block_bytes: int = 64 << 20) -> dict[str, Any]:
    """Read every chunk of every dataset (HDF5 checks each chunk's checksum) in bounded memory: ``block`` rows
    at a time, fewer where they would take more than ``block_bytes`` (224-px images: 445 rows).

    Returns ``{"rows", "datasets", "checksummed"}``; raises :class:`DfkdError` naming the first dataset that fails.
    Also checks the schema and that labels fit the bank's class count.
    """
    path = Path(path)
    with _open(path) as h5:
        attrs = read_attrs(h5, path)
        task = get_task(attrs["task"])
        n = validate(h5, path, task.target)
        k = (attrs.get("dataset") or {}).get("num_classes")
        names = sorted(h5.keys())
        for name in names:
            row = max(1, int(np.prod(h5[name].shape[1:])) * h5[name].dtype.itemsize)
            step = max(1, min(block, block_bytes // row))
            for i in range(0, max(n, 1), step):
                values = _read(h5, name, slice(i, i + step), path)
                if name == task.target and k and n:  # the targets fit the classes, checked as they are read
                    task.check_targets(torch.from_numpy(values.astype(np.int64)), int(k), str(path))
        return {"rows": n, "datasets": names, "checksummed": checksummed(h5)}
