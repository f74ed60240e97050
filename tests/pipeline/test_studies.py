"""The CIFAR studies (pipelines/*) run: every stage of each, through its own dvc.yaml, on a CIFAR fixture.

Each study is copied to a scratch folder with its published params shrunk (the caps of ``scripts/dvc_deps.py``:
one epoch, one round, batches of 32, ...) and pointed at what exists here: CIFAR-10/100 written in torchvision's
own layout (``tests/fixtures/cifar_layout.py``, read by torchvision's real loaders; only their md5 check is bypassed,
by ``tests/fixtures/cifar_md5`` on the subprocesses' PYTHONPATH), the teacher imported (``teacher.source: import``)
from random weights in the authors' key layout (``--keys cmi``), a folder of images as DFND's wild pool, and the
offline diffusion prior as DDA's variation model (Stable Diffusion is not installed). The published params files
are never edited. ``dvc repro``'s output (its "Running stage" lines) is shown in the test log as it runs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from authors import authors_state
from cifar_layout import write_cifar10, write_cifar100
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
# the CIFAR studies (the ImageNet one is checked, not run: tests/pipeline/test_imagenet_study.py)
STUDIES = sorted(p.name for p in (ROOT / "pipelines").iterdir()
                 if (p / "dvc.yaml").is_file() and p.name.startswith("cifar"))


def _module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "DFKD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": os.pathsep.join([str(FIXTURES / "cifar_md5"), str(ROOT)]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_class=12, test_per_class=6)
    write_cifar100(root, per_class=2, test_per_class=1)
    return root


def overlay(params: dict[str, Any], data: Path, weights: Path, pool: Path) -> dict[str, Any]:
    """The study's published params, shrunk and pointed at the fixture (see the module docstring)."""
    tiny = _module(ROOT / "scripts" / "dvc_deps.py", "dvc_deps").shrink(copy.deepcopy(params))
    tiny["teacher"].update(source="import", weights=str(weights), keys="cmi", data_root=str(data))
    tiny["distill"]["common"]["data_root"] = str(data)
    if "retrieve" in tiny:
        tiny["retrieve"]["common"].update(wild=[f"folder:{pool}"], workers=0, num_select=48)
    if "augment" in tiny:
        tiny["augment"]["common"]["model"] = f"sdedit-prior:{ROOT / 'priors' / 'offline-pool-32x1'}"
    return tiny


def _wild_pool(folder: Path, n: int = 96) -> Path:
    """A folder of 32x32 colour images: smooth random blobs, as unlabeled 'wild' data."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_every_stage_of_the_study_runs_through_its_own_dvc_yaml(study: str, tmp_path: Path, cifar: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = ROOT / "pipelines" / study
    published = yaml.safe_load((source / "params.yaml").read_text())
    work = tmp_path / study
    work.mkdir()
    (work / "dvc.yaml").write_text((source / "dvc.yaml").read_text())
    teacher = published["teacher"]
    num_classes = 100 if teacher["dataset"] == "cifar100" else 10
    weights = tmp_path / "authors_teacher.pth"
    torch.save({"state_dict": authors_state("cmi", teacher["arch"], num_classes)}, weights)
    params = overlay(published, cifar, weights, _wild_pool(tmp_path / "pool"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
    stages = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=work, env=env, check=True,
                            capture_output=True, text=True).stdout.split()
    lines = []
    with capsys.disabled():  # DVC's "Running stage" lines in the CI log, as they come
        print(f"\n==== dvc repro: pipelines/{study} (tiny overlay on the CIFAR fixture)", flush=True)
        proc = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("Running stage", "ERROR", "error:")) or "Traceback" in line:
                print(f"  [{study}] {line.rstrip()}", flush=True)
        rc = proc.wait(timeout=1800)
    assert rc == 0, "".join(lines[-60:])
    ran = {ln.split("'")[1] for ln in lines if ln.startswith("Running stage '")}
    assert ran == set(stages), (sorted(set(stages) - ran), sorted(ran - set(stages)))
    for metrics in (work / "artifacts" / "students").glob("*.metrics.json"):
        assert 0 <= yaml.safe_load(metrics.read_text())["test_acc"] <= 1
    assert (work / "artifacts" / "reports" / "report.md").is_file()
    assert yaml.safe_load((source / "params.yaml").read_text()) == published  # the published params untouched
