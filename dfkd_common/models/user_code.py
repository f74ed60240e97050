"""Your own network, by reference: ``package.module:Class`` or ``path/to/file.py:Class``.

Data-free distillation exists for a classifier someone else trained, and that classifier is almost never one of
dfkd's zoo. So a model reference may name the user's code; every artifact records the reference, its kwargs and a
fingerprint of the defining source file (sha256), and every stage rebuilds the network through it.

Why trust is explicit: importing a module runs it. A weights file never runs code (safetensors, or a ``.pth``
read with ``weights_only=True``), but a checkpoint that names ``mynet:MyNet`` would, on load, import ``mynet``:
a checkpoint someone sent must not run code the reader did not choose. So a stage imports user code only for a
module the user has allowed in this run: the reference given on its own command line (``teacher import --arch``,
``teacher train --arch``, ``distill --student``), ``--trust-code MODULE`` on any stage that loads a model, or
``trust_code: [MODULE, ...]`` at the top of the params file (for pipelines). Otherwise one line names the module
and how to allow it. A file reference is allowed by its path or by its file name's stem (``mynet`` for
``nets/mynet.py:MyNet``).

When the source file has changed since the checkpoint was written, the weights may no longer fit the code (or
fit code that now computes something else): a warning names both fingerprints; loading goes on, because a
comment or a new method changes a file's bytes too, and a real mismatch fails loudly at ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.index import INDEX

#: a dotted module name (``mynet``, ``pkg.nets``)
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: the modules (and file paths and stems) this process may import for model references
_TRUSTED: set[str] = set()
#: constructor arguments by which a network may take the number of classes and of input channels
CLASS_ARGS = ("num_classes", "n_classes", "classes")
CHANNEL_ARGS = ("in_channels", "in_chans", "channels")


@dataclass(frozen=True)
class CodeRef:
    """A parsed reference: the module (a dotted name, or a ``.py`` file's path) and the class in it."""

    module: str
    name: str

    @property
    def is_file(self) -> bool:
        return self.module.endswith(".py")

    @property
    def names(self) -> tuple[str, ...]:
        """What ``--trust-code`` may name to allow it: the module, and a file's path and stem."""
        if self.is_file:
            path = Path(self.module)
            return (self.module, str(path.resolve()), path.stem)
        return (self.module, self.module.split(".")[0])

    @property
    def trust_name(self) -> str:
        """The name the error message suggests."""
        return Path(self.module).stem if self.is_file else self.module

    def __str__(self) -> str:
        return f"{self.module}:{self.name}"


def parse(ref: str) -> CodeRef | None:
    """``ref`` as user code (None: not a user-code reference, e.g. ``lenet5`` or a registered ``source:name``)."""
    module, sep, name = ref.rpartition(":")
    if not sep or not name.isidentifier() or module in INDEX.get("model source", {}):  # torchvision:resnet18
        return None
    if module.endswith(".py") or _MODULE.match(module):
        return CodeRef(module, name)
    return None


def trust(*modules: str) -> None:
    """Allow user code from ``modules`` (module names, file paths or stems, or whole references) in this run."""
    for m in modules:
        ref = parse(m)
        _TRUSTED.update(ref.names if ref else (m, str(Path(m).resolve()) if m.endswith(".py") else m))


def trust_reference(arch: str) -> None:
    """The user named ``arch`` on the command line (``--arch``, ``--student``): its code is theirs to run."""
    ref = parse(arch)
    if ref is not None:
        trust(*ref.names)
    program = program_path(arch)
    if program is not None:
        trust(*_path_names(program))


# -- TorchScript programs (``torchscript:PATH``): they carry their own code, so they are trusted the same way ----
PROGRAM = "torchscript:"


def program_path(arch: str) -> Path | None:
    """The file of a ``torchscript:PATH`` reference (None: another kind of reference)."""
    return Path(arch[len(PROGRAM):]) if arch.startswith(PROGRAM) else None


def _path_names(path: Path) -> tuple[str, ...]:
    return (str(path), str(path.resolve()), path.stem)


def load_program(path: Path) -> nn.Module:
    """A TorchScript program, loaded only if trusted (``--trust-code PATH`` or its stem): ``torch.jit.load`` runs
    the code the file carries."""
    if not any(n in _TRUSTED for n in _path_names(path)):
        raise DfkdError(f"model {PROGRAM}{path} is a TorchScript program, which carries code: allow it first with "
                        f"--trust-code {path.stem} (pipelines: trust_code: [{path.stem}] in params.yaml)")
    if not path.is_file():
        raise DfkdError(f"model {PROGRAM}{path}: no such file")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise DfkdError(f"{path} is not a TorchScript program ({(str(exc).strip().splitlines() or ['?'])[0]})"
                        ) from None


def code_fingerprint(arch: str) -> dict[str, str] | None:
    """What a checkpoint of ``arch`` records of the code it runs: the defining source file (your module) or the
    program file (TorchScript) and its sha256; None for dfkd's zoo, torchvision and timm."""
    ref = parse(arch)
    if ref is not None:
        return fingerprint(ref)
    program = program_path(arch)
    if program is not None and program.is_file():
        return {"ref": arch, "file": str(program.resolve()), "sha256": hashlib.sha256(program.read_bytes()).hexdigest()}
    return None


def is_trusted(ref: CodeRef) -> bool:
    return any(n in _TRUSTED for n in ref.names)


def untrust_all() -> None:
    """Forget every allowance (tests: each run states its own)."""
    _TRUSTED.clear()


def load_class(ref: CodeRef) -> type[nn.Module]:
    """The class ``ref`` names, imported only if trusted; checked to be an ``nn.Module`` subclass before it is
    called."""
    if not is_trusted(ref):
        raise DfkdError(f"model {ref} is code outside dfkd: importing it runs it, so allow it first with "
                        f"--trust-code {ref.trust_name} (pipelines: trust_code: [{ref.trust_name}] in params.yaml)")
    module = _import(ref)
    obj = getattr(module, ref.name, None)
    if obj is None:
        raise DfkdError(f"model {ref}: {ref.module} has no {ref.name}")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise DfkdError(f"model {ref}: {ref.name} is a {type(obj).__name__}, not an nn.Module subclass")
    return obj


def _import(ref: CodeRef) -> Any:
    if ref.is_file:
        path = Path(ref.module).resolve()
        if not path.is_file():
            raise DfkdError(f"model {ref}: no such file {path}")
        name = f"dfkd_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise DfkdError(f"model {ref}: {path} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise DfkdError(f"model {ref}: importing {path} failed ({type(exc).__name__}: {exc})") from None
        return module
    try:
        return importlib.import_module(ref.module)
    except ModuleNotFoundError as exc:
        raise DfkdError(f"model {ref}: cannot import {ref.module} ({exc}); install it or put it on PYTHONPATH"
                        ) from None
    except Exception as exc:
        raise DfkdError(f"model {ref}: importing {ref.module} failed ({type(exc).__name__}: {exc})") from None


def build(ref: CodeRef, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """An instance of ``ref``'s class: the number of classes and of input channels are passed under the names its
    constructor takes (``num_classes``/``n_classes``/``classes``, ``in_channels``/``in_chans``/``channels``) unless
    ``kwargs`` give them; whether its outputs match is checked by a forward pass afterwards (its caller)."""
    cls = load_class(ref)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    given = dict(kwargs)
    for names, value in ((CLASS_ARGS, num_classes), (CHANNEL_ARGS, in_channels)):
        if not any(n in given for n in names):
            for n in names:
                if n in params:
                    given[n] = value
                    break
    try:
        return cls(**given)
    except TypeError as exc:
        raise DfkdError(f"model {ref}: {exc} (give its constructor's arguments with --arch-kwargs K=V)") from None


def fingerprint(ref: CodeRef) -> dict[str, str]:
    """The source file that defines ``ref``'s class and its sha256 (recorded in every checkpoint of it)."""
    cls = load_class(ref)
    try:
        path = Path(inspect.getsourcefile(cls) or "")
    except TypeError:
        return {"ref": str(ref), "file": "", "sha256": ""}
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return {"ref": str(ref), "file": str(path), "sha256": digest}


def check_fingerprint(arch: str, recorded: dict[str, str] | None, where: str) -> None:
    """Warn (one line) when the code file's bytes differ from those the checkpoint ``where`` recorded."""
    if not recorded or not recorded.get("sha256"):
        return
    now = code_fingerprint(arch)
    if now and now["sha256"] and now["sha256"] != recorded["sha256"]:
        warnings.warn(f"{where}: the code of {arch} ({now['file']}) changed since the checkpoint was written "
                      f"(sha256 {recorded['sha256'][:12]} then, {now['sha256'][:12]} now)", stacklevel=2)
