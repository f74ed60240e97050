"""Banks larger than memory (issue 32): written in bounded memory, equal however they were written, resumed
exactly after ``kill -9`` mid-write, streamed in chunk-aligned blocks that visit every row once per epoch and
split disjointly across ranks, with a corrupted chunk failing in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from corrupt import flip_bank_byte
from numbered_rows import HEADER, ids_of, numbered

from dfkd_common.bank import load_bank, verify_bank
from dfkd_common.bank_stream import StreamBatches, StreamConfig, StreamedBank
from dfkd_common.dist import World
from dfkd_common.errors import DfkdError
from dfkd_common.jobs import Job, merged_rows, work_dir

ROOT = Path(__file__).resolve().parents[2]
def datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {k: h5[k][:] for k in h5}


# ----------------------------------------------------------------------------------------------- writing
def test_a_bank_written_shard_by_shard_equals_the_one_written_whole(tmp_path: Path) -> None:
    whole = tmp_path / "whole.h5"
    HEADER.write(whole, [numbered(0, 1000)])
    with Job(tmp_path / "rounds.h5", {"k": 1}) as job:
        for start in range(0, 1000, 37):  # shards that do not line up with the chunks
            job.write("bank", **numbered(start, min(37, 1000 - start)))
        job.checkpoint({})
        assert job.publish_bank(HEADER) == 1000
    a, b = datasets(whole), datasets(tmp_path / "rounds.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert verify_bank(tmp_path / "rounds.h5")["checksummed"]


def test_merged_rows_follow_the_order_across_shards(tmp_path: Path) -> None:
    paths, sizes = [], []
    for s, (start, n) in enumerate([(0, 30), (30, 50), (80, 20)]):
        with Job(tmp_path / f"s{s}.h5", {"k": s}) as job:
            job.write("bank", **numbered(start, n))
            job.checkpoint({})
            paths.append(str(job.work / job.tables["bank"][0][0]))
            sizes.append(n)
    order = np.random.default_rng(0).permutation(100)
    got = np.concatenate([b["images"] for b in merged_rows(paths, sizes, order, block=16, cached=1)])
    assert ids_of(torch.from_numpy(got)) == order.tolist()


WRITER = """
import sys, resource
sys.path.insert(0, {root!r}); sys.path.insert(0, {fixtures!r})
from numbered_rows import HEADER, numbered
out, shards = sys.argv[1], int(sys.argv[2])
n = HEADER.write(out, (numbered(i * 2000, 2000) for i in range(shards)))  # shards of 2,000 rows, 2 MB of images
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_writing_a_bank_does_not_hold_it_in_memory(tmp_path: Path) -> None:
    """The peak memory of writing a 16 MB bank and of writing a 164 MB one: the same."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER.format(root=str(ROOT), fixtures=str(ROOT / "tests" / "fixtures"))))
    peaks = {}
    for shards in (8, 80):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{shards}.h5"), str(shards)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        n, peaks[shards] = map(int, proc.stdout.split())
        assert n == shards * 2000
    grown = (tmp_path / "80.h5").stat().st_size - (tmp_path / "8.h5").stat().st_size
    assert grown > 140e6 and peaks[80] - peaks[8] < grown / 10, (peaks, grown)


KILLED = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {fixtures!r})
from numbered_rows import HEADER, numbered
from dfkd_common.jobs import Job
out = sys.argv[1]
with Job(out, {{"k": 7}}) as job:
    if job.state is None:
        for i in range(12):
            job.write("bank", **numbered(i * 500, 500))
        job.checkpoint({{"done": True}})
    real = job.shards
    def slow(table):
        for shard in real(table):
            time.sleep(0.3)
            yield shard
    job.shards = slow
    job.publish_bank(HEADER)
"""


def test_kill_9_in_the_middle_of_writing_resumes_to_the_same_bank(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED.format(root=str(ROOT), fixtures=str(ROOT / "tests" / "fixtures"))))
    out = tmp_path / "b.h5"
    proc = subprocess.Popen([sys.executable, str(script), str(out)])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.h5.*.partial")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a few shards into the file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".b.h5.*.partial")) and work_dir(out).is_dir()
    again = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".b.h5.*.partial"))  # the killed run's partial file is gone
    HEADER.write(tmp_path / "ref.h5", [numbered(i * 500, 500) for i in range(12)])
    a, b = datasets(out), datasets(tmp_path / "ref.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- streaming
def _bank(tmp_path: Path, n: int = 1000) -> StreamedBank:
    HEADER.write(tmp_path / "s.h5", [numbered(0, n)])
    return StreamedBank.open(tmp_path / "s.h5")


CFG = StreamConfig(mode="always", block_mib=0.05, buffer=3, workers=0)  # blocks of 51 KiB


def test_blocks_are_whole_chunks(tmp_path: Path) -> None:
    bank = _bank(tmp_path)
    blocks = bank.blocks(100 * 1024)
    assert bank.chunk_rows == 1024 and blocks == [(0, 1000)]  # 1 MiB chunks of 1x32x32: the whole bank
    small = StreamedBank(bank.path, 1000, bank.image_shape, 64, bank.attrs, True).blocks(100 * 1024)
    assert all(a % 64 == 0 for a, _ in small) and small[-1][1] == 1000 and len(small) == 16


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_epoch_visits_every_row_once(tmp_path: Path, workers: int) -> None:
    bank = _bank(tmp_path)
    bank = StreamedBank(bank.path, bank.n, bank.image_shape, 32, bank.attrs, True)  # 32 blocks of 32 rows
    memory = torch.from_numpy(numbered(1000, 200)["images"]), torch.arange(200)
    cfg = StreamConfig(mode="always", block_mib=0.05, buffer=3, workers=workers)
    stream = StreamBatches(memory, [bank], cfg, torch.device("cpu"))
    seen = [i for images, _ in stream.batches(64, seed=5, cycles=1, drop_last=False) for i in ids_of(images)]
    assert sorted(seen) == list(range(1200))
    assert seen[:64] != sorted(seen[:64])  # shuffled
    again = [i for images, _ in stream.batches(64, seed=5, cycles=1, drop_last=False) for i in ids_of(images)]
    assert again == seen  # the seed says it all


def test_two_ranks_read_disjoint_blocks_that_cover_the_bank(tmp_path: Path) -> None:
    bank = _bank(tmp_path)
    bank = StreamedBank(bank.path, bank.n, bank.image_shape, 50, bank.attrs, True)
    got = []
    for rank in (0, 1):
        stream = StreamBatches(None, [bank], CFG, torch.device("cpu"), World(rank=rank, size=2))
        got.append({i for images, _ in stream.batches(16, seed=9, cycles=1, drop_last=False)
                    for i in ids_of(images)})
        blocks = list(stream.blocks(9, cycles=1))
        assert len(blocks) == 10 and all(len(b[0]) == 50 for b in blocks)  # whole chunks, its own only
    assert not got[0] & got[1] and got[0] | got[1] == set(range(1000))
    assert abs(len(got[0]) - len(got[1])) <= 50


def test_a_corrupted_chunk_fails_the_stream_in_one_line(tmp_path: Path) -> None:
    bank = _bank(tmp_path)
    flip_bank_byte(bank.path)
    for workers in (0, 1):
        stream = StreamBatches(None, [bank], StreamConfig(mode="always", workers=workers), torch.device("cpu"))
        with pytest.raises(DfkdError, match="fail their checksum") as err:
            next(stream.batches(16, seed=0))
        assert "\n" not in str(err.value)


def test_auto_streams_only_banks_above_the_limit() -> None:
    cfg = StreamConfig(above_mib=1)
    assert cfg.streams(2 * 2**20) and not cfg.streams(2**20)
    assert StreamConfig(mode="always").streams(1) and not StreamConfig(mode="never").streams(2**40)
    with pytest.raises(DfkdError, match=r"stream\.mode"):
        StreamConfig(mode="sometimes")


def test_dfkd_distill_streams_a_bank_and_mixes_it_with_one_in_memory(teacher_ckpt: Path, tmp_path: Path,
                                                                      small_bank, dfkd) -> None:
    big = small_bank(tmp_path / "big.h5", n=300, rounds=2)
    little = small_bank(tmp_path / "little.h5", n=100)
    proc = dfkd("distill", "--teacher", teacher_ckpt, "--bank", little, "--bank", big, "--out", tmp_path / "s.st",
                "--metrics", tmp_path / "m.json", "--set", "epochs=1", "--set", "batch_size=50",
                "--set", "stream.above_mib=0.3", "--set", "stream.block_mib=1")
    assert proc.returncode == 0, proc.stderr
    assert "streamed from disk: big.h5" in proc.stdout, proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 700  # 100 in memory + 600 streamed
    assert len(load_bank(little)) == 100


def test_an_online_run_trains_on_a_streamed_bank_beside_its_growing_one(teacher_ckpt: Path, tmp_path: Path,
                                                                        small_bank, dfkd) -> None:
    from dfkd_common.checkpoint import file_checksum

    big = small_bank(tmp_path / "big.h5", n=300, rounds=2)
    (tmp_path / "none.yaml").write_text("{}\n")
    proc = dfkd("distill", "--online", "dafl", "--teacher", teacher_ckpt, "--bank", big, "--out",
                tmp_path / "s.st", "--plots", tmp_path / "p.json", "--params", tmp_path / "none.yaml",
                "--set", "epochs=2", "--set", "batch_size=50", "--set", "stream.mode=always",
                "--set", "online.batch_size=32", "--set", "online.g_steps=1", "--set", "online.ngf=8")
    assert proc.returncode == 0, proc.stderr
    assert "streamed from disk: big.h5" in proc.stdout, proc.stdout
    sizes = [row["bank_size"] for row in json.loads((tmp_path / "p.json").read_text())]
    grown = load_bank(tmp_path / "s.bank.h5")
    assert sizes[-1] == 600 + len(grown) and sizes[0] > 600  # the streamed rows and the online rows, mixed
    assert grown.attrs["parent_checksum"] == file_checksum(big)  # the grown bank names the bank it grew beside


def test_a_stream_with_fewer_blocks_than_ranks_is_one_error_not_a_hang(tmp_path: Path) -> None:
    bank = _bank(tmp_path)  # one 1 MiB chunk: one block
    with pytest.raises(DfkdError, match="1 block"):
        StreamBatches(None, [bank], CFG, torch.device("cpu"), World(rank=1, size=2))


def test_labels_beyond_the_classes_fail_the_stream_in_one_line(tmp_path: Path) -> None:
    cols = numbered(0, 100)
    cols["labels"][7] = 12  # mnist5k has 10 classes
    HEADER.write(tmp_path / "bad.h5", [cols])
    stream = StreamBatches(None, [StreamedBank.open(tmp_path / "bad.h5")], CFG, torch.device("cpu"))
    with pytest.raises(DfkdError, match=r"bad\.h5"):
        next(stream.batches(16, seed=0))


def test_images_left_on_disk_are_read_row_by_row_even_for_one_row(tmp_path: Path) -> None:
    for n in (1, 300):
        HEADER.write(tmp_path / f"{n}.h5", [numbered(0, n)])
        lazy, whole = load_bank(tmp_path / f"{n}.h5", images=False), load_bank(tmp_path / f"{n}.h5")
        assert lazy.on_disk and not whole.on_disk and len(lazy) == n
        rows = [n - 1, 0, n // 2]
        assert torch.equal(lazy.read_images(rows), whole.images[rows])
        assert torch.equal(torch.cat(list(lazy.image_blocks(block=7))), whole.images)


def test_dfad_refuses_a_streamed_bank_as_it_refuses_one_in_memory(teacher_ckpt: Path, tmp_path: Path,
                                                                   small_bank, dfkd, one_line_error) -> None:
    big = small_bank(tmp_path / "big.h5", n=300)
    proc = dfkd("distill", "--online", "dfad", "--teacher", teacher_ckpt, "--bank", big, "--out", tmp_path / "s.st",
                "--set", "stream.mode=always")
    one_line_error(proc, "without --bank")
