"""Synthesis methods. Importing this package registers every method module listed here."""

from dfkd_common.synthesis import (  # noqa: F401  (registration side effects)
    coupling,
    cpnet,
    csd,
    dafl,
    deepinversion,
    fast,
    geninv,
    nayer,
)
from dfkd_common.synthesis.base import SYNTHESIZERS, Synthesizer, SynthResult, build_synthesizer

__all__ = ["SYNTHESIZERS", "SynthResult", "Synthesizer", "build_synthesizer"]
