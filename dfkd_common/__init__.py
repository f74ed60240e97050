"""dfkd: data-free knowledge distillation library (the testable core under the ``dfkd`` CLI)."""

from dfkd_common import tvguard as _tvguard  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.2.0"
