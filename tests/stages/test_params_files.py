"""Every params.yaml the project ships (the default pipeline and pipelines/*) is accepted by its stages.

The CIFAR studies need a GPU and a download to *run*, so CI can never run them; it can build everything they
configure. For each file this resolves every stage section exactly as the CLI does (defaults, ``common`` + the
run's section, type checks) and constructs what the run would construct (student, student loss, augmentation,
the online feed with its synthesizer and generator, offline synthesizers) around an untrained teacher of the
file's architecture. A renamed param, a wrong type or a method that cannot be built from its published settings
fails here instead of hours into a GPU run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dfkd_common import __version__
from dfkd_common.checkpoint import ModelMeta, load_model, now, save_model
from dfkd_common.config import given, resolve
from dfkd_common.data import DatasetInfo, get_dataset
from dfkd_common.data.offline_pool import OfflinePool
from dfkd_common.engine import Engine
from dfkd_common.jobs import Job
from dfkd_common.loops.synthesis_rounds import split_params
from dfkd_common.models import build_model
from dfkd_common.online.base import RecordedFeed
from dfkd_common.retrieval import RetrieveRun
from dfkd_common.runs.student_run import online_feed, resolve_run
from dfkd_common.runs.teacher_run import TeacherRun
from dfkd_common.student import StudentSide, TermSetup
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.variation.augment import AugmentRun
from dfkd_common.variation.models import VARIATIONS
from dfkd_common.variation.prior import PriorConfig

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "pipelines").glob("*/params.yaml"))]


def online_runs(dvc_file: Path) -> dict[str, str]:
    """Run name -> online method, from the ``foreach`` of the dvc.yaml stages that call ``--online``."""
    runs: dict[str, str] = {}
    for stage in yaml.safe_load(dvc_file.read_text())["stages"].values():
        if "foreach" in stage and "--online" in stage["do"]["cmd"]:
            each = stage["foreach"]
            words = stage["do"]["cmd"].split()
            method = words[words.index("--online") + 1]
            if method != "${item}":  # one method for every run (dicts of other settings as items: DDA)
                runs.update(dict.fromkeys(each, method))
            else:
                runs.update(each if isinstance(each, dict) else {k: k for k in each})
        elif "--online" in stage.get("cmd", ""):  # a stage of its own (the ImageNet study's distill_fast)
            words = stage["cmd"].split()
            runs[words[words.index("--name") + 1]] = words[words.index("--online") + 1]
    return runs


def sections(path: Path, section: str) -> list[str]:
    sec = yaml.safe_load(path.read_text()).get(section) or {}
    return [k for k in sec if k != "common"]


def described_teacher(dvc_file: Path) -> tuple[str, DatasetInfo]:
    """A study whose teacher's input is described on `teacher import`'s command line (no registered dataset:
    ImageNet): its architecture and data description, read from that command."""
    words = yaml.safe_load(dvc_file.read_text())["stages"]["teacher"]["cmd"].split()

    def arg(flag: str) -> str:
        return words[words.index(flag) + 1]

    classes = int(arg("--classes"))
    info = DatasetInfo("described", int(arg("--channels")), int(arg("--image-size")), classes,
                       tuple(map(str, range(classes))), tuple(map(float, arg("--mean").split(","))),
                       tuple(map(float, arg("--std").split(","))))
    return arg("--arch"), info


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.parent.name if p.parent != ROOT else "default")
def test_shipped_params_build(path: Path, tmp_path: Path) -> None:
    if "teacher" in yaml.safe_load(path.read_text()):
        t_cfg = resolve(TeacherRun, path, "teacher", seed_from="seed")
        info = get_dataset(t_cfg.dataset, **t_cfg.dataset_kwargs).info  # static: nothing is downloaded
        arch, arch_kwargs = t_cfg.arch, t_cfg.arch_kwargs
    else:
        (arch, info), arch_kwargs = described_teacher(path.parent / "dvc.yaml"), {}
    teacher = build_model(arch, info.num_classes, info.channels, info.mean, info.std, image_size=info.image_size,
                          task=info.task, **arch_kwargs)
    ckpt = tmp_path / "teacher.safetensors"
    save_model(ckpt, teacher, ModelMeta(arch, {}, info, {"test_acc": 0.9}, {}, now(), __version__, "teacher"))
    teacher = load_model(ckpt)[0]
    engine = Engine.create("cpu", amp=False)
    runs = online_runs(path.parent / "dvc.yaml")
    built = []
    for name in sections(path, "distill"):  # every run the file configures, online or from a bank
        cfg = resolve_run(path, name, online=runs.get(name))
        student = build_model(cfg.student, info.num_classes, info.channels, info.mean, info.std,
                              image_size=info.image_size, task=info.task, **cfg.student_kwargs)
        StudentSide(student, cfg.weights, cfg.terms, TermSetup(teacher, student, info.channels, info.image_size, 0.9,
                                                               info.task))
        if name in runs:
            online = {k: v for k, v in cfg.online.items() if k != "method"}
            with Job(tmp_path / f"{name}.h5", {}) as job:
                feed = online_feed(runs[name], online, teacher, ckpt, info, None, job, cfg, engine)
            assert isinstance(feed, RecordedFeed)
            built.append(name)
    assert sorted(built) == sorted(runs), "every online run of dvc.yaml has a params section"
    for method in sections(path, "synthesize"):
        _, method_cfg = split_params(given(path, "synthesize", method, seed_from="method_seed",
                                           profile_required=False), method)
        build_synthesizer(method, teacher, info, method_cfg, engine)
    for name in [None, *sections(path, "retrieve")]:
        resolve(RetrieveRun, path, "retrieve", name, seed_from="method_seed")
    for name in [None, *sections(path, "augment")]:  # the model comes from the CLI: the pipeline's is the prior
        run = resolve(AugmentRun, path, "augment", name, seed_from="method_seed")
        VARIATIONS.get("sdedit-prior").check(run.variation)
    if "prior" in yaml.safe_load(path.read_text()):
        resolve(PriorConfig, path, "prior", seed_from="seed")
    if "pool" in yaml.safe_load(path.read_text()):
        resolve(OfflinePool, path, "pool", seed_from="seed")
