"""Make ``import torchvision`` work with a CPU torch and the CUDA-built torchvision wheel.

On PyPI, torchvision 0.28.0 ships only a CUDA build. Paired with the CPU build of torch 2.13.0 its compiled
extension (``torchvision/_C.so``) cannot load, and ``torchvision/_meta_registrations.py`` then fails with
"operator torchvision::nms does not exist" while registering fake kernels for ops that were never defined.
That also breaks transformers' CLIP image classes and diffusers' pipelines, which import torchvision.

:func:`ensure_torchvision` tries to load the extension the way torchvision would; only when that fails does it
define the operators' *schemas* (no kernels) so the import succeeds. Detection, transforms, datasets and models
then work; calling a compiled op such as ``nms`` raises ``NotImplementedError``, which is honest. Where the
extension loads (a matching CPU or CUDA pair), this module does nothing.

It must run before anything imports torchvision, yet importing dfkd must not import torch (``dfkd --help`` starts
without it): :func:`install`, called by ``dfkd_common/__init__.py``, puts a finder at the front of
``sys.meta_path`` that runs :func:`ensure_torchvision` the moment anything first imports torchvision (ours,
transformers', diffusers'), then steps aside and lets the normal import proceed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

# Schemas as torchvision's C++ registers them (torchvision/csrc/ops/*.cpp, TORCH_LIBRARY_FRAGMENT).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_state: dict[str, object] = {}


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for candidate in sorted(Path(loc).glob("_C*.so")) + sorted(Path(loc).glob("_C*.pyd")):
            return candidate
    return None


def ensure_torchvision() -> bool:
    """Prepare torch so torchvision imports; return True if stub schemas had to be defined."""
    if "patched" in _state:
        return bool(_state["patched"])
    if "torchvision" in sys.modules:  # already imported (successfully or not): nothing we can do now
        _state["patched"] = False
        return False
    import torch

    so = _extension_path()
    patched = False
    if so is not None:
        try:
            torch.ops.load_library(str(so))
        except (OSError, RuntimeError):
            patched = _define_schemas()
    _state["patched"] = patched
    return patched


def _define_schemas() -> bool:
    import torch as _torch

    lib = _torch.library.Library("torchvision", "FRAGMENT")
    defined = False
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        if hasattr(_torch.ops.torchvision, name):
            continue
        lib.define(schema)
        defined = True
    _state["lib"] = lib  # keep the Library object alive, or its definitions are dropped
    return defined


class _Guard(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision` before the first import of torchvision, once; finds nothing itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            uninstall()
            ensure_torchvision()
        return None


def install() -> None:
    """Guard the first import of torchvision (idempotent); if it is already imported, there is nothing to do."""
    if "torchvision" in sys.modules or any(isinstance(f, _Guard) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Guard())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Guard)]
