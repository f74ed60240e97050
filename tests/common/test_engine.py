"""Precision chosen by capability: bf16 autocast only where the device computes bf16 natively.

The detection is tested with torch's CPU/CUDA queries mocked both ways, so it holds on every machine whatever
its own instructions are.
"""

from __future__ import annotations

import pytest
import torch

from dfkd_common.engine import Engine, native_bf16, resolve_amp
from dfkd_common.errors import DfkdError

CPU = torch.device("cpu")


def _cpu(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(True, False, True), (False, True, True),
                                                            (False, False, False)])
def test_cpu_bf16_is_native_only_with_the_instructions(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool,
                                                       amx: bool, native: bool) -> None:
    _cpu(monkeypatch, avx512_bf16, amx)
    assert native_bf16(CPU) is native
    assert resolve_amp("auto", CPU) is native
    engine = Engine.create("cpu", amp="auto")
    assert engine.amp is native
    assert engine.precision == ("bf16-autocast" if native else "fp32")
    assert ("no native bf16" in engine.describe()) is not native


def test_forced_settings_ignore_the_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, False)
    assert Engine.create("cpu", amp=True).amp is True
    assert "as set" in Engine.create("cpu", amp=True).describe()
    _cpu(monkeypatch, True)
    assert Engine.create("cpu", amp=False).amp is False


def test_a_onednn_isa_cap_below_bf16_means_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16(CPU) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert native_bf16(CPU) is True


@pytest.mark.parametrize(("capability", "native"), [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_cuda_bf16_is_native_from_ampere_on(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                            native: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(torch.device("cuda", 0)) is native


@pytest.mark.parametrize("bad", ["maybe", 1, None, "yes"])
def test_other_amp_values_are_one_line_errors(bad: object) -> None:
    with pytest.raises(DfkdError, match="must be auto, true or false"):
        resolve_amp(bad, CPU)

