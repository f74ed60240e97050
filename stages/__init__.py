"""Thin typer commands over :mod:`dfkd_common`, one module per pipeline stage."""

from dfkd_common import tvguard as _tvguard  # noqa: F401  (before anything imports torchvision)
