"""Thin typer commands over :mod:`dfkd_common`, one module per pipeline stage (imported when their command runs)."""

import dfkd_common as _dfkd_common  # noqa: F401  (installs the torchvision guard before any stage imports torchvision)
