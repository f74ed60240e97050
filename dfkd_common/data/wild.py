"""Wild (unlabeled) image pools for DFND retrieval: image folders, registered datasets, existing banks.

A pool is a concatenation of sources addressed by one global row index. Nothing reads the whole pool: the
retrieval stage asks for batches of row indices and a DataLoader whose items *are* batches
(``batch_size=None``) reads them, so an HDF5 bank is read in contiguous slices and a folder decodes only the
files of the batch. Worker processes open HDF5 files themselves on first use (an h5py handle does not survive
pickling or forking), and folder sources carry only their list of paths.

Every image is converted to the teacher's input on the way out:

* channels: 1 -> 3 repeats the grey plane; 3 -> 1 is ITU-R BT.601 luma (what PIL's ``convert("L")`` does);
  4 (RGBA) drops alpha first. Anything else (2 channels, a 5-channel bank, a teacher that wants 2 channels)
  cannot be converted meaningfully and fails with a :class:`DfkdError` before any work.
* size: the whole image is resized (squashed, not cropped) to the teacher's square input with an antialiased
  bilinear filter; that is how the downsampled-ImageNet pools of the DFND paper were made (whole images,
  box-resized to 32x32), and it keeps every object in view.

Unreadable files in a folder (truncated, not an image, unsupported codec) do not stop a run: the row comes
back with ``ok=False`` and a zero image, the scorer skips and counts it.

Source specs on the command line (``dfkd retrieve --wild SPEC ...``):

* ``folder:PATH`` or an existing directory: every image file below it, any nesting, sorted by path.
* ``bank:PATH`` or an existing ``.h5`` file: the images of a bank (labels ignored). A bank with a ``source``
  column (e.g. the offline demo pool) keeps its per-row source names, so retrieval can report what it picked
  from each.
* ``dataset:NAME[:SPLIT]`` or a registered dataset name: that dataset's images, labels ignored (SPLIT is
  ``train`` (default), ``test`` or ``all``). Registered datasets are in-memory loaders by design (they are
  small), so this source is the one exception to streaming.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dfkd_common.data.datasets import DATASETS, get_dataset, resize_uint8
from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw, shape_str

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
CONVERTIBLE = (1, 3, 4)  # source channel counts we can turn into 1 or 3
TARGETS = (1, 3)
LUMA = (0.299, 0.587, 0.114)


def check_channels(c: int, target: int, what: str) -> None:
    """Fail early (one clear line) when ``c``-channel images cannot become ``target``-channel ones."""
    if target not in TARGETS:
        raise DfkdError(f"{what}: the teacher expects {target}-channel images; wild pools convert only to 1 or 3")
    if c != target and c not in CONVERTIBLE:
        raise DfkdError(f"{what}: cannot convert {c}-channel images to {target} channels "
                        f"(convertible: {', '.join(map(str, CONVERTIBLE))} -> 1 or 3)")


def convert_channels(x: torch.Tensor, target: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, target, H, W); see the module docstring for the rules."""
    c = x.shape[1]
    if c == target:
        return x
    if c == 4:
        x, c = x[:, :3], 3
        if target == 3:
            return x
    if c == 1 and target == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and target == 1:
        w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DfkdError(f"cannot convert {c}-channel images to {target} channels")


def to_target(x: torch.Tensor, channels: int, size: Size) -> torch.Tensor:
    return resize_uint8(convert_channels(x, channels), size)


# ------------------------------------------------------------------------------------------- sources
@dataclass
class WildSource:
    """One source of unlabeled images. ``read`` returns converted images, an ok mask and local source ids."""

    spec: str
    size: int = 0
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.size

    def check(self, channels: int, image_size: Size) -> None:
        """Validate convertibility before any work (sources that know their channels override)."""

    def read(self, rows: np.ndarray, channels: int, image_size: Size) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    def fingerprint(self) -> str:
        """What a resumable scoring state must match (sizes and identities, not contents)."""
        return f"{self.spec}:{self.size}"


@dataclass
class FolderSource(WildSource):
    root: Path = Path()
    files: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path) -> FolderSource:
        if not root.is_dir():
            raise DfkdError(f"wild folder {root} does not exist or is not a directory")
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                         if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise DfkdError(f"wild folder {root} has no image files "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)} at any depth)")
        return cls(spec=f"folder:{root}", size=len(files), names=[f"folder:{root.name}"], root=root, files=files)

    def read(self, rows: np.ndarray, channels: int, image_size: Size) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        from PIL import Image

        mode = "L" if channels == 1 else "RGB"
        h, w = as_hw(image_size)
        out = torch.zeros(len(rows), channels, h, w, dtype=torch.uint8)
        ok = np.zeros(len(rows), dtype=bool)
        for j, r in enumerate(rows):
            try:
                with Image.open(self.files[int(r)]) as im:
                    im.draft(mode, (w, h))  # JPEG: decode at a reduced scale, much faster
                    im = im.convert(mode).resize((w, h), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8).reshape(h, w, channels)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue
            out[j] = torch.from_numpy(arr.transpose(2, 0, 1).copy())
            ok[j] = True
        return out, ok, np.zeros(len(rows), dtype=np.int64)

    def fingerprint(self) -> str:
        return f"{self.spec}:{self.size}:{self.files[0]}:{self.files[-1]}"


@dataclass
class DatasetSource(WildSource):
    images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, 1, 1, dtype=torch.uint8))

    @classmethod
    def open(cls, name: str, split: str, root: str | None = None) -> DatasetSource:
        DATASETS.get(name)  # unknown names fail with the list of known ones
        spec = get_dataset(name)
        splits = ("train", "test") if split == "all" else (split,)
        if any(s not in ("train", "test") for s in splits):
            raise DfkdError(f"dataset source {name}: split must be train, test or all, not {split!r}")
        images = torch.cat([spec.load(s, root).images for s in splits])
        return cls(spec=f"dataset:{name}:{split}", size=len(images), names=[f"dataset:{name}"], images=images)

    def check(self, channels: int, image_size: Size) -> None:
        check_channels(int(self.images.shape[1]), channels, self.spec)

    def read(self, rows: np.ndarray, channels: int, image_size: Size) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        x = to_target(self.images[torch.from_numpy(rows)], channels, image_size)
        return x, np.ones(len(rows), dtype=bool), np.zeros(len(rows), dtype=np.int64)


@dataclass
class BankSource(WildSource):
    path: Path = Path()
    channels: int = 0
    has_source: bool = False
    _h5: Any = field(default=None, repr=False)
    _pid: int = field(default=-1, repr=False)

    @classmethod
    def open(cls, path: Path) -> BankSource:
        from dfkd_common.bank import bank_info

        info = bank_info(path)  # validates schema and shapes
        names = list(info["attrs"].get("source_names") or [])
        has_source = "source" in info["fields"] and bool(names)
        return cls(spec=f"bank:{path}", size=int(info["n"]), names=names if has_source else [f"bank:{path.stem}"],
                   path=path, channels=int(info["image_shape"][0]), has_source=has_source)

    def check(self, channels: int, image_size: Size) -> None:
        check_channels(self.channels, channels, self.spec)

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():  # first use in this process (worker or main)
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def read(self, rows: np.ndarray, channels: int, image_size: Size) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        h5 = self._file()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        contiguous = hi - lo == len(rows)
        sel: Any = slice(lo, hi) if contiguous else rows  # h5py fancy indexing needs increasing rows
        x = torch.from_numpy(h5["images"][sel])
        src = h5["source"][sel].astype(np.int64) if self.has_source else np.zeros(len(rows), dtype=np.int64)
        return to_target(x, channels, image_size), np.ones(len(rows), dtype=bool), src

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, -1
        return state

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"{self.spec}:{self.size}:{st.st_size}:{int(st.st_mtime)}"


def open_source(spec: str, data_root: str | None = None) -> WildSource:
    """Parse one ``--wild`` spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        return FolderSource.open(Path(rest))
    if kind == "bank" and rest:
        return BankSource.open(Path(rest))
    if kind == "dataset" and rest:
        name, _, split = rest.partition(":")
        return DatasetSource.open(name, split or "train", data_root)
    path = Path(spec)
    if path.is_dir():
        return FolderSource.open(path)
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        return BankSource.open(path)
    if spec in DATASETS:
        return DatasetSource.open(spec, "train", data_root)
    raise DfkdError(f"wild source {spec!r}: not a folder, a bank (.h5) or a registered dataset "
                    f"(or say folder:PATH, bank:PATH, dataset:NAME[:SPLIT])")


# ---------------------------------------------------------------------------------------------- pool
class WildPool:
    """Several sources behind one global row index, read in batches converted to ``channels`` x ``size``."""

    def __init__(self, sources: list[WildSource], channels: int, image_size: Size) -> None:
        if not sources:
            raise DfkdError("no wild sources given")
        if channels not in TARGETS:
            raise DfkdError(f"the teacher expects {channels}-channel images; wild pools convert only to 1 or 3")
        for s in sources:
            s.check(channels, image_size)
        self.sources = sources
        self.channels = channels
        self.image_size = as_hw(image_size)
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        # global source names: each source's sub-names, de-duplicated across sources, in first-seen order
        self.names: list[str] = []
        self.maps: list[np.ndarray] = []
        for s in sources:
            ids = []
            for n in s.names:
                if n not in self.names:
                    self.names.append(n)
                ids.append(self.names.index(n))
            self.maps.append(np.asarray(ids, dtype=np.int64))
        if len(self) == 0:
            raise DfkdError("the wild pool is empty")

    @classmethod
    def open(cls, specs: list[str], channels: int, image_size: Size, data_root: str | None = None) -> WildPool:
        return cls([open_source(s, data_root) for s in specs], channels, image_size)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        return "|".join(s.fingerprint() for s in self.sources) + f"|{shape_str(self.channels, self.image_size)}"

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows (sorted global indices) -> images uint8 (b, C, H, W), index, ok, source (global ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = np.searchsorted(self.offsets, rows, side="right") - 1
        images, oks, srcs = [], [], []
        for k in np.unique(parts):
            m = parts == k
            x, ok, src = self.sources[k].read(rows[m] - self.offsets[k], self.channels, self.image_size)
            images.append(x)
            oks.append(ok)
            srcs.append(self.maps[k][np.clip(src, 0, len(self.maps[k]) - 1)])
        return {"images": torch.cat(images), "index": torch.from_numpy(rows),
                "ok": torch.from_numpy(np.concatenate(oks)), "source": torch.from_numpy(np.concatenate(srcs))}

    def loader(self, rows: range | np.ndarray, batch_size: int,
               workers: int = 0) -> DataLoader[dict[str, torch.Tensor]]:
        """Iterate ``rows`` (a range, or sorted indices) in batches, in order; ``workers`` processes read ahead.

        A range stays lazy (no per-row array for the whole pool), which keeps memory flat as the pool grows.
        """
        return DataLoader(_Batches(self, rows, batch_size), batch_size=None, shuffle=False, num_workers=workers,
                          prefetch_factor=4 if workers else None, persistent_workers=False)


class _Batches(Dataset[dict[str, torch.Tensor]]):
    """Items are whole batches: contiguous HDF5 slices, one decode loop per folder batch."""

    def __init__(self, pool: WildPool, rows: range | np.ndarray, batch_size: int) -> None:
        self.pool = pool
        self.rows = rows
        self.batch_size = max(1, batch_size)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        part = self.rows[k * self.batch_size : (k + 1) * self.batch_size]
        rows = np.arange(part.start, part.stop, dtype=np.int64) if isinstance(part, range) else np.asarray(part)
        return self.pool.read(rows)
