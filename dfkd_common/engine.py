"""Device, precision, seeding, progress and atomic file writes: the run-time plumbing every stage shares.

Precision is chosen by capability (``amp: auto``, the default of every synthesis pass): bf16 autocast only where
the device computes bf16 natively, fp32 elsewhere. Measured with ``benchmarks/bench_synthesis.py`` and
``benchmarks/bench_dfad_peer.py`` on two 2-core machines of the same cloud type: with AVX512-bf16, bf16 autocast
plus channels_last sped generator and teacher steps up 1.8-4x; *without* it bf16 is emulated and was 1.3-2.7x
slower than fp32 for every method (DFAD's published MNIST iteration: 17.0 s in bf16, 6.6 s in fp32).
"Is bf16 supported?" is the wrong question (emulation answers yes); :func:`native_bf16` asks for the
instructions. ``amp: true``/``false`` force it. Student and teacher training keep their fp32 default (the
accuracy of small models suffers under bf16). channels_last helps fp32 too (DFAD 12.8 -> 6.6 s per iteration),
except on 1-channel pixel optimisation (DeepInversion's params turn it off).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dfkd_common.errors import DfkdError, NonFiniteLossError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available (honouring ``LOCAL_RANK`` under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


#: accepted values of an ``amp`` param: ``auto`` (bf16 where native), or a forced on/off
AMP_VALUES = ("auto", True, False)

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that include native bf16 instructions; a lower cap emulates bf16
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "DEFAULT", "ALL")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (not merely accepts it: CPUs without the instructions emulate
    bf16, several times slower than fp32).

    CUDA: compute capability >= 8.0 (Ampere on). CPU: AVX512-bf16 or AMX tiles, as torch's cpuinfo reports them,
    unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below those instructions.
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in _ONEDNN_BF16_ISAS:
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_amp(setting: Any, device: torch.device, where: str = "amp") -> bool:
    """``auto`` -> :func:`native_bf16`; ``true``/``false`` as given; anything else is a one-line error."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return native_bf16(device)
    if isinstance(setting, bool):
        return setting
    raise DfkdError(f"{where} must be auto, true or false, got {setting!r}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a torch.Generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def rng_state() -> dict[str, Any]:
    """Capture all RNG states so a resumed run continues the same random stream."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Engine:
    """Where and how tensors are computed.

    ``amp`` enables bf16 autocast (CPU and CUDA), already resolved to a bool; :meth:`create` resolves ``"auto"``
    and keeps what was asked in ``amp_setting`` so stages can say why. ``channels_last`` converts conv models and
    image batches.
    """

    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    amp: bool = True
    channels_last: bool = True
    amp_setting: Any = None  # what the params asked for ("auto", True, False); None: amp was given resolved

    @classmethod
    def create(cls, device: str | torch.device = "auto", amp: Any = "auto", channels_last: bool = True,
               where: str = "amp") -> Engine:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(dev, resolve_amp(amp, dev, where), channels_last, amp)

    @property
    def precision(self) -> str:
        """``bf16-autocast`` or ``fp32``: recorded in metrics and bank provenance."""
        return "bf16-autocast" if self.amp else "fp32"

    def describe(self) -> str:
        """One line for the console: the precision chosen and why (``amp: auto`` explains its decision)."""
        line = f"precision {self.precision} on {self.device}"
        if isinstance(self.amp_setting, str):
            native = "native bf16" if self.amp else "no native bf16 here, where emulated bf16 is slower than fp32"
            return f"{line} (amp auto: {native})"
        return f"{line} (amp {'on' if self.amp else 'off'}, as set)"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast where this engine's ``amp`` is on, nothing otherwise: the one place precision is applied
        (a pass that must stay fp32, like evaluation, simply does not enter it)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def parallel(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        """``module`` as this run's processes train it: wrapped in DDP (gradients averaged across ranks) under
        torchrun, itself in one process. ``find_unused``: some of its parameters may get no gradient in a step."""
        from dfkd_common.dist import current

        if not current().distributed:
            return module
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused)

    def sibling(self, amp: Any, where: str = "amp") -> Engine:
        """The same device and memory format at another precision setting (online synthesis' ``online.amp``)."""
        return Engine.create(self.device, amp=amp, channels_last=self.channels_last, where=where)


def fused_adam(params: Any, lr: float, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): generator optimisers step every few milliseconds on small nets.

    The default per-tensor loop cost 9 ms of CPNet's 134 ms step on the CPU (``benchmarks/bench_online.py``);
    the fused kernel does the same update about 4x faster. Parameter groups and ``state_dict`` are unchanged.
    """
    return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Stop a run with a clear message instead of writing NaN weights or images."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} became {value}; lower the learning rate or check the inputs")


def progress(transient: bool = False) -> Progress:
    """A rich progress bar shared by all long loops (hidden automatically when stdout is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        disable=os.environ.get("DFKD_NO_PROGRESS") == "1",
    )


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def make_parent(path: str | os.PathLike[str]) -> Path:
    """Create ``path``'s directory (and its parents); a refusal is one :class:`DfkdError` naming ``path``."""
    path = Path(path)
    for above in (path.parent, *path.parent.parents):
        if above.exists():
            if not above.is_dir():
                raise DfkdError(f"cannot write {path}: {above} is not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DfkdError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def ensure_writable(*paths: str | os.PathLike[str] | None) -> None:
    """Check, before any work, that each output can be created: its directory exists or can be made and takes a
    new file. Stages call this first, so a typo in ``--out`` fails in one line, not after an hour of training."""
    for p in paths:
        if p is None:
            continue
        path = make_parent(p)
        if path.is_dir():
            raise DfkdError(f"cannot write {path}: it is a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DfkdError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    An interrupted or failing writer therefore never leaves a partial file under the final name, and never
    replaces an existing good artifact.
    """
    final = Path(final)
    make_parent(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".partial", dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise DfkdError(f"cannot write {final}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; an artifact gets the permissions open() would give
        os.replace(tmp_path, final)
    except OSError as exc:  # a full disk or a vanished directory while writing: name the artifact, not the temp
        raise DfkdError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


#: the columns of every stage's ``--metrics`` file (what ``dvc metrics show`` / ``dvc exp show`` tabulate) besides
#: the task's own metrics (classification: ``test_acc``); ``x_teacher`` is the headline metric over the teacher's
COMMON_HEADLINE = ("x_teacher", "seconds", "images", "images_per_s")


def headline_keys(task: str = "classification") -> tuple[str, ...]:
    """Every key a metrics file may hold for a run of ``task``: its metrics first, then :data:`COMMON_HEADLINE`."""
    from dfkd_common.tasks import get_task

    return (*get_task(task).metric_names, *COMMON_HEADLINE)


def details_path(path: str | os.PathLike[str]) -> Path:
    """Where the full record of a metrics file goes: ``x.metrics.json`` -> ``x.details.json``."""
    p = Path(path)
    base = p.name.removesuffix(".metrics.json") if p.name.endswith(".metrics.json") else p.stem
    return p.with_name(f"{base}.details.json")


def write_metrics(path: str | os.PathLike[str], record: dict[str, Any], task: str = "classification",
                  **headline: Any) -> None:
    """The headline figures (at most :func:`headline_keys` of ``task``) to ``path``, the full record beside it.

    Why two files: DVC tabulates every key of every metrics file, so per-class counts, loss parts and
    provenance made ``dvc metrics show`` a 70-column table; the details stay one ``cat`` away. Both files, and
    the per-epoch plots file, are described in ``docs/ARTIFACTS.md``.
    """
    unknown = set(headline) - set(headline_keys(task))
    if unknown:
        raise ValueError(f"not headline metrics: {sorted(unknown)}")
    write_json(details_path(path), record)
    write_json(path, {k: v for k, v in headline.items() if v is not None})
