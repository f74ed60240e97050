"""Reading the default pipeline's banks for training: whole into memory, as before streaming existed, against
what ``dfkd distill`` does now (open each bank's header to decide, then read the small ones whole).

    python benchmarks/bench_bank_read.py [artifacts/banks/dafl.h5 ...]

Prints the median of 20 reads of each way, interleaved, and the ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfkd_common.bank import concat_banks, load_bank  # noqa: E402
from dfkd_common.bank_stream import StreamConfig  # noqa: E402
from dfkd_common.checkpoint import read_meta  # noqa: E402
from dfkd_common.runs.student_run import load_banks  # noqa: E402


def main() -> None:
    banks = [Path(p) for p in sys.argv[1:]] or [ROOT / "artifacts/banks/dafl.h5", ROOT / "artifacts/banks/csd.h5"]
    info = read_meta(ROOT / "artifacts/teachers/lenet5.safetensors").dataset
    whole, now = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        parts = [load_bank(b) for b in banks]
        for p in parts:
            p.check_compatible(info)
        concat_banks(parts)
        whole.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data, streamed = load_banks(banks, info, False, StreamConfig())
        now.append(time.perf_counter() - t0)
        assert not streamed and data is not None
    a, b = statistics.median(whole), statistics.median(now)
    print(f"{' + '.join(b.name for b in banks)} ({len(data)} images): whole {1000 * a:.1f} ms, "
          f"dfkd distill now {1000 * b:.1f} ms ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
