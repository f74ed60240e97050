"""Several processes under torchrun (gloo on the CPU): sharded steps, rank 0 writes, one process = the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfkd_common.bank import BankWriter, load_bank

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3
ENV = {**os.environ, "DFKD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "DFKD_DIST_TIMEOUT_MIN": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory: pytest.TempPathFactory, mnist_train) -> Path:
    """2,048 real training digits as a retrieved bank (labels: the true ones): distillation learns fast."""
    path = tmp_path_factory.mktemp("bank") / "digits.h5"
    pick = torch.randperm(len(mnist_train), generator=torch.Generator().manual_seed(0))[:2048]  # every class
    with BankWriter(path, channels=1, image_size=32, kind="retrieved", method="test",
                    dataset=mnist_train.info.to_dict()) as w:
        w.append(mnist_train.images[pick], mnist_train.labels[pick], 0)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distill_args(teacher: Path, bank: Path, out: Path, params: Path) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--bank", str(bank), "--out", str(out),
            "--metrics", str(out.with_suffix(".json")), "--plots", str(out.with_suffix(".plots.json")),
            "--params", str(params), "--device", "cpu", "--set", f"epochs={EPOCHS}", "--set", "batch_size=64",
            "--set", "student=lenet5_half", "--set", "augment={crop_pad: 2}"]


def _torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "stages.cli"]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "none.yaml"
    path.write_text("{}\n")
    return path


def _plots(out: Path) -> list[dict[str, float]]:
    return json.loads(out.with_suffix(".plots.json").read_text())


@pytest.mark.parametrize("streamed", [False, True])
def test_two_ranks_distill_from_a_bank_rank_0_writes_and_each_takes_half_the_steps(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, params: Path, streamed: bool) -> None:
    """Also with the bank streamed (blocks of whole 1 MiB chunks: each rank reads its own 1,024 digits)."""
    out = tmp_path / "s2.safetensors"
    stream = ["--set", "stream.mode=always", "--set", "stream.block_mib=0.0625"] if streamed else []
    proc = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2")
                          + _distill_args(teacher_ckpt, digits_bank, out, params) + stream,
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.with_suffix(".json").read_text())
    details = json.loads(out.with_name("s2.details.json").read_text())
    assert metrics["test_acc"] > 0.8, metrics  # chance 0.1 on the real held-out digits
    assert details["world_size"] == 2
    assert all(row["student_steps"] == 2048 // 64 // 2 for row in _plots(out))  # 1/N of the epoch's 32 steps
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("s2", ".s2"))) == [
        "s2.details.json", "s2.json", "s2.plots.json", "s2.safetensors"]  # no rank's state left, one artifact
    assert proc.stdout.count("student ") == 1  # rank 0 prints the result, the other rank nothing


def test_one_rank_under_torchrun_is_the_single_process_run_to_the_digit(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, params: Path) -> None:
    single, ranked = tmp_path / "single.safetensors", tmp_path / "ranked.safetensors"
    for cmd, out in (([sys.executable, "-m", "stages.cli"], single),
                     (_torchrun("--standalone", "--nproc_per_node", "1"), ranked)):
        proc = subprocess.run(cmd + _distill_args(teacher_ckpt, digits_bank, out, params), cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(single), load_file(ranked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_with_a_localhost_rendezvous_complete_a_distillation(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, params: Path) -> None:
    out = tmp_path / "nodes.safetensors"
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                        "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "dfkd-test")
                              + _distill_args(teacher_ckpt, digits_bank, out, params),
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["test_acc"] > 0.8
    assert all(row["student_steps"] == 16 for row in _plots(out))


def _synth_args(teacher: Path, out: Path, params: Path, rounds: int = 6) -> list[str]:
    return ["synthesize", "--method", "geninv", "--teacher", str(teacher), "--out", str(out), "--params", str(params),
            "--device", "cpu", "--rounds", str(rounds), "--set", "batch_size=16", "--set", "g_steps=3",
            "--set", "ngf=8", "--set", "nz=16", "--set", "amp=false"]


def test_two_ranks_synthesize_every_round_once_into_one_deterministic_bank(
        tmp_path: Path, teacher_ckpt: Path, params: Path) -> None:
    banks = []
    for name in ("a.h5", "b.h5"):
        proc = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2")
                              + _synth_args(teacher_ckpt, tmp_path / name, params, rounds=5),
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        banks.append(load_bank(tmp_path / name))
    a, b = banks
    assert a.rounds.tolist() == [r for r in range(5) for _ in range(16)]  # every round once, in round order
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.attrs["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5", "none.yaml"]  # no rank's work left


def test_two_ranks_distill_online_csd_rank_0_publishes_the_bank_of_both(
        tmp_path: Path, teacher_ckpt: Path, params: Path) -> None:
    out = tmp_path / "on.safetensors"
    proc = subprocess.run(
        [*_torchrun("--standalone", "--nproc_per_node", "2"), "distill", "--online", "csd",
         "--teacher", str(teacher_ckpt), "--out", str(out),
           "--metrics", str(out.with_suffix(".json")), "--plots", str(out.with_suffix(".plots.json")),
           "--params", str(params), "--device", "cpu", "--set", "epochs=4", "--set", "kd_steps=20",
           "--set", "batch_size=64", "--set", "online.batch_size=64", "--set", "online.g_steps=15",
           "--set", "online.lr_g=0.01", "--set", "online.ngf=16", "--set", "online.augment={crop_pad: 2}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bank = load_bank(tmp_path / "on.bank.h5")
    assert bank.rounds.tolist() == [r for r in range(8) for _ in range(64)]  # 2 ranks x 4 epochs, rank order
    assert json.loads(out.with_suffix(".json").read_text())["test_acc"] > 0.5  # chance 0.1
    assert all(row["student_steps"] == 10 for row in _plots(out))
    assert not any(".rank1" in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("stage", ["synthesize", "distill"])
def test_a_killed_rank_ends_the_run_and_a_rerun_resumes(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, params: Path, stage: str) -> None:
    if stage == "synthesize":
        out = tmp_path / "k.h5"
        args = _synth_args(teacher_ckpt, out, params, rounds=40)
        progress = tmp_path / ".k.rank1.h5.work"  # rank 1's job: a shard per round
        started = lambda: progress.is_dir() and len(list(progress.glob("*"))) >= 3  # noqa: E731
    else:
        out = tmp_path / "k.safetensors"
        args = [*_distill_args(teacher_ckpt, digits_bank, out, params), "--set", "epochs=6"]
        state = tmp_path / ".k.rank1.safetensors.state.safetensors"
        started = state.exists
    run = subprocess.Popen(_torchrun("--standalone", "--nproc_per_node", "2") + args, cwd=REPO, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not started() and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert started(), "rank 1 never got going"
    os.kill(_workers(run.pid)[1], signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and not out.exists()
    assert "SIGKILL" in err or "Signal 9" in err  # torchrun names the failed rank and its signal
    assert "error: rank 0" in err and "rerun the same command to resume" in err  # one line from rank 0
    proc = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2") + args, cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if stage == "synthesize":
        assert load_bank(out).rounds.tolist() == [r for r in range(40) for _ in range(16)]
    else:
        assert [row["epoch"] for row in _plots(out)] == list(range(1, 7))  # each epoch once: resumed


def _workers(agent: int) -> list[int]:
    """The worker processes of a torchrun agent, by rank (their LOCAL_RANK)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return [found[r] for r in sorted(found)]


def test_the_gpu_check_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    """The same script a lent GPU runs, at toy sizes: a GPU attempt never fails on a typo."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=REPO, env={**ENV, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["method"] for r in report["throughput"]} == {"deepinversion", "dafl", "fast", "nayer", "cpnet",
                                                           "geninv", "rgal", "csd"}
    assert [r["run"] for r in report["runs"]][:5] == ["teacher", "synthesize", "augment", "distill_bank",
                                                      "distill_online"]
    assert any(r["run"] == "dfad_published" for r in report["runs"])


def test_two_ranks_augment_every_source_once_in_source_order_and_train_a_teacher(
        tmp_path: Path, teacher_ckpt: Path, digits_bank: Path, params: Path) -> None:
    outs = []
    for name, n in (("one.h5", "1"), ("two.h5", "2"), ("two_again.h5", "2")):
        proc = subprocess.run(
            [*_torchrun("--standalone", "--nproc_per_node", n), "augment", "--teacher", str(teacher_ckpt),
             "--bank", str(digits_bank), "--out", str(tmp_path / name),
             "--model", str(REPO / "priors/offline-pool-32x1"),
             "-k", "2", "--sources", "96", "--omega", "0", "--params", str(params), "--device", "cpu",
             "--set", "batch_size=16", "--set", "variation={strength: 0.5, steps: 3}"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(load_bank(tmp_path / name))
    one, two, again = outs
    parents = [b.extra["parent_index"] for b in outs]
    assert len(two) == 192 and torch.equal(parents[1], parents[0])  # every source once, in source order
    assert torch.equal(two.images, again.images)  # the same bank for the same seed and world size
    assert float((two.images.float() - one.images.float()).abs().mean()) < 1.0  # the same noise per variation
    proc = subprocess.run(
        [*_torchrun("--standalone", "--nproc_per_node", "2"), "teacher", "train", "--dataset", "mnist5k", "--arch",
         "lenet5", "--epochs", "1", "--out", str(tmp_path / "t.safetensors"), "--metrics", str(tmp_path / "t.json"),
         "--params", str(params), "--device", "cpu"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "t.json").read_text())["test_acc"] > 0.5


def test_two_ranks_distill_online_dfad_each_rank_its_own_generator(
        tmp_path: Path, teacher_ckpt: Path, params: Path) -> None:
    out = tmp_path / "dfad.safetensors"
    proc = subprocess.run(
        [*_torchrun("--standalone", "--nproc_per_node", "2"), "distill", "--online", "dfad",
         "--teacher", str(teacher_ckpt), "--out", str(out), "--metrics", str(out.with_suffix(".json")),
         "--plots", str(out.with_suffix(".plots.json")), "--params", str(params), "--device", "cpu",
         "--set", "epochs=2", "--set", "batch_size=32", "--set", "weights={kd: 0, l1: 1}",
         "--set", "online={iterations: 4, student_steps: 2, ngf: 8, nz: 16, record: 5}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bank = load_bank(tmp_path / "dfad.bank.h5")
    assert bank.rounds.tolist() == [0] * 10 + [1] * 10  # each epoch: both ranks' samples of 5
    assert not torch.equal(bank.images[:5], bank.images[5:10])  # two generators, two seeds
    assert all(row["student_steps"] == 4 for row in _plots(out))  # 8 steps an epoch, half per rank
