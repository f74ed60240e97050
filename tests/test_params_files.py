"""Every params.yaml the project ships (the default pipeline and pipelines/*) is accepted by its stages.

The CIFAR studies need a GPU and a download to *run*, so CI can never run them; it can build everything they
configure. For each file this resolves every stage section exactly as the CLI does (defaults, ``common`` + the
run's section, type checks) and constructs what the run would construct (student, student loss, augmentation,
the online feed with its synthesizer and generator, offline synthesizers) around an untrained teacher of the
file's architecture. A renamed param, a wrong type or a method that cannot be built from its published settings
fails here instead of hours into a GPU run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dfkd_common import __version__
from dfkd_common.augment_ops import augment_config
from dfkd_common.checkpoint import ModelMeta, load_model, now, save_model
from dfkd_common.data import get_dataset
from dfkd_common.data.offline_pool import DEFAULTS as POOL_DEFAULTS
from dfkd_common.engine import Engine
from dfkd_common.jobs import Job
from dfkd_common.loops.synthesis_rounds import split_params
from dfkd_common.models import build_model
from dfkd_common.online.base import RecordedFeed
from dfkd_common.student import StudentSide, TermSetup
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.variation.augment import AugmentConfig
from dfkd_common.variation.models import VARIATIONS
from dfkd_common.variation.prior import PriorConfig
from stages import augment as augment_stage
from stages import distill as distill_stage
from stages import retrieve as retrieve_stage
from stages import synthesize as synthesize_stage
from stages import teacher as teacher_stage
from stages.common import apply_overrides, load_params

ROOT = Path(__file__).resolve().parents[1]
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
    return runs


def sections(path: Path, section: str) -> list[str]:
    sec = yaml.safe_load(path.read_text()).get(section) or {}
    return [k for k in sec if k != "common"]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.parent.name if p.parent != ROOT else "default")
def test_shipped_params_build(path: Path, tmp_path: Path) -> None:
    t_params = apply_overrides(load_params(path, "teacher"), None, defaults=teacher_stage.DEFAULTS, where="teacher",
                               types=teacher_stage.TYPES)
    info = get_dataset(t_params["dataset"]).info  # static: nothing is downloaded
    teacher = build_model(t_params["arch"], info.num_classes, info.channels, info.mean, info.std,
                          **t_params["arch_kwargs"])
    ckpt = tmp_path / "teacher.safetensors"
    meta = ModelMeta(t_params["arch"], {}, info, {"test_acc": 0.9}, {}, now(), __version__, "teacher")
    save_model(ckpt, teacher, meta)
    teacher = load_model(ckpt)[0]
    engine = Engine.create("cpu", amp=False)
    runs = online_runs(path.parent / "dvc.yaml")
    built = []
    for name in sections(path, "distill"):  # every run the file configures, online or from a bank
        params = distill_stage.resolve_params(path, name)
        student = build_model(params["student"], info.num_classes, info.channels, info.mean, info.std,
                              **params["student_kwargs"])
        StudentSide(student, params["weights"], params["terms"], TermSetup(teacher, student, info.channels,
                                                                             info.image_size, 0.9))
        augment_config(params["augment"])
        if name in runs:
            cfg = {k: v for k, v in dict(params["online"]).items() if k != "method"}
            with Job(tmp_path / f"{name}.h5", {}) as job:
                feed = distill_stage.online_feed(runs[name], cfg, teacher, ckpt, info, None, job, params, engine)
            assert isinstance(feed, RecordedFeed)
            built.append(name)
    assert sorted(built) == sorted(runs), "every online run of dvc.yaml has a params section"
    for method in sections(path, "synthesize"):
        _, cfg = split_params(synthesize_stage.resolve_params(path, method))
        build_synthesizer(method, teacher, info, cfg, engine)
    for name in [None, *sections(path, "retrieve")]:
        apply_overrides(load_params(path, "retrieve", name), None, defaults=retrieve_stage.DEFAULTS,
                        where="retrieve", types=retrieve_stage.TYPES)
    for name in [None, *sections(path, "augment")]:  # the model comes from the CLI: the pipeline's is the prior
        params = apply_overrides(load_params(path, "augment", name), None, defaults=augment_stage.DEFAULTS,
                                 where="augment", types=augment_stage.TYPES)
        cfg = AugmentConfig(**{k: params[k] for k in asdict(AugmentConfig())})
        VARIATIONS.get("sdedit-prior").check(cfg.variation)
    if "prior" in yaml.safe_load(path.read_text()):
        PriorConfig(**apply_overrides(load_params(path, "prior"), None, defaults=asdict(PriorConfig()),
                                      where="prior"))
    if "pool" in yaml.safe_load(path.read_text()):
        apply_overrides(load_params(path, "pool"), None, defaults=POOL_DEFAULTS, where="pool")
