"""Synthesis methods: the interface and registry here; each method is its own module, imported when named
(:data:`dfkd_common.index.INDEX`)."""

from dfkd_common.synthesis.base import SYNTHESIZERS, Synthesizer, SynthResult, build_synthesizer

__all__ = ["SYNTHESIZERS", "SynthResult", "Synthesizer", "build_synthesizer"]
