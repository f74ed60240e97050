"""dfkd: data-free knowledge distillation library (the testable core under the ``dfkd`` CLI).

Importing the package is cheap on purpose (no torch): the version comes from the installed package's metadata,
and the torchvision guard is an import hook that acts only when torchvision is first imported.
"""

from importlib.metadata import PackageNotFoundError, version

from dfkd_common import tvguard as _tvguard

_tvguard.install()

try:
    __version__ = version("dfkd")
except PackageNotFoundError:  # a source tree on sys.path without an install: artifacts say so
    __version__ = "0+unknown"
