"""The declared index: every registered component's name and the module that registers it.

Registries are lazy (:mod:`dfkd_common.registry`): a method, a term, a dataset or a model source is imported when
it is named, not when the package is imported, so a stage loads (and its DVC stage depends on) only the code it
runs, and ``dfkd --help`` starts without torch. This page is what makes that possible: it is plain data, read
without importing anything, and ``dfkd methods`` lists every registry from it. ``tests/common/test_registry.py`` imports
every module of the package and checks that each name here is registered by exactly the module this index gives,
and that no module registers a name the index lacks, so the index cannot drift from the code.

Adding a component: register it in its module (``@SYNTHESIZERS.register("mymethod")``) and add one line here.
"""

from __future__ import annotations

_DATA = "dfkd_common.data.datasets"
_ZOO = "dfkd_common.models.zoo"
_LOSSES = "dfkd_common.synthesis.losses"

#: registry kind -> {name: module that registers it}; kinds are the names the registries give themselves
INDEX: dict[str, dict[str, str]] = {
    "task": {
        "classification": "dfkd_common.tasks.classification",
        "segmentation": "dfkd_common.tasks.segmentation",
    },
    "model source": {
        "zoo": "dfkd_common.models.sources",
        "torchvision": "dfkd_common.models.sources",
        "timm": "dfkd_common.models.sources",
        "code": "dfkd_common.models.sources",
        "torchscript": "dfkd_common.models.sources",
    },
    "dataset": {**{name: _DATA for name in ("mnist5k", "digits", "mnist", "cifar10", "cifar100", "svhn",
                                            "imagefolder")},
                "mnist5k-seg": "dfkd_common.data.canvases",
                **{name: "dfkd_common.data.segmentation_folders" for name in ("camvid", "nyuv2", "voc")}},
    "model": {name: _ZOO for name in ("lenet5", "lenet5_half", "resnet18", "resnet34", "wrn_16_1", "wrn_16_2",
                                      "wrn_40_1", "wrn_40_2", "vgg11_bn", "deeplab_mini", "deeplab_mini_half")},
    "generator": {
        "dcgan": "dfkd_common.models.generators",
        "coupled": "dfkd_common.models.coupled",
    },
    "synthesis method": {
        "deepinversion": "dfkd_common.synthesis.deepinversion",
        "dafl": "dfkd_common.synthesis.dafl",
        "fast": "dfkd_common.synthesis.fast",
        "nayer": "dfkd_common.synthesis.nayer",
        "cpnet": "dfkd_common.synthesis.cpnet",
        "geninv": "dfkd_common.synthesis.geninv",
        "rgal": "dfkd_common.synthesis.geninv",
        "csd": "dfkd_common.synthesis.csd",
    },
    "loss term": {
        **{name: _LOSSES for name in ("bn", "oh", "ie", "act", "tv", "l2", "adv", "triplet")},
        "xn": "dfkd_common.synthesis.coupling",
        "align": "dfkd_common.synthesis.coupling",
        "dda": "dfkd_common.synthesis.csd",
    },
    "student term": {
        "kd": "dfkd_common.student.kd",
        "ce": "dfkd_common.student.ce",
        "l1": "dfkd_common.student.l1",
        "na": "dfkd_common.student.noise_adaptation",
        "striplet": "dfkd_common.student.relation",
        "cd": "dfkd_common.student.relation",
        "fea": "dfkd_common.student.dda",
        "rot": "dfkd_common.student.dda",
    },
    "online method": {
        "dfad": "dfkd_common.online.dfad",
    },
    "variation model": {
        "sdedit-prior": "dfkd_common.variation.models",
        "sd-image-variations": "dfkd_common.variation.models",
    },
    "key map": {
        "cmi": "dfkd_common.imports",
        "dfad": "dfkd_common.imports",
    },
}

#: the tasks each method serves where it is more than classification (a method not named here inverts or distils
#: classifiers only, and is refused on another task in one line); ``tests/common/test_registry.py`` holds the
#: methods' own ``tasks`` to this
TASKS_SERVED: dict[str, tuple[str, ...]] = {
    "deepinversion": ("classification", "segmentation"),
    "dafl": ("classification", "segmentation"),
    "dfad": ("classification", "segmentation"),
}

#: the ``dfkd`` sub-commands: name -> (stage module, attribute: a typer app or a command function, one-line help).
#: The console script imports a stage module only when its command runs (or its own ``--help`` is asked for).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "teacher": ("stages.teacher", "app", "Teacher models: train on a dataset, or import one trained elsewhere."),
    "synthesize": ("stages.synthesize", "main", "Invert the teacher into an image bank with a synthesis method."),
    "pool": ("stages.pool", "app", "Wild (unlabeled) image pools for retrieval."),
    "retrieve": ("stages.retrieve", "main", "DFND: the wild pool's images the teacher finds relevant, as a bank."),
    "prior": ("stages.prior", "app", "The offline diffusion prior of `dfkd augment`."),
    "augment": ("stages.augment", "main", "DDA: diffusion image variations of a bank, filtered by the teacher."),
    "distill": ("stages.distill", "main", "Train a student from banks, or online against a synthesis method."),
    "evaluate": ("stages.evaluate", "main", "A checkpoint's metrics on a real test split."),
    "report": ("stages.report", "main", "Compare students: a table, a JSON and a figure."),
    "export": ("stages.export", "main", "A checkpoint out of dfkd: ONNX, TorchScript or a state dict."),
    "quantize": ("stages.quantize", "main", "An int8 ONNX model of a checkpoint, calibrated (or fine-tuned) on banks."),
    "bank": ("stages.bank", "app", "Inspect image banks: info, grid, verify."),
}

#: how ``dfkd methods`` titles each registry, in the order it lists them
TITLES: dict[str, str] = {
    "task": "tasks",
    "model source": "model sources",
    "dataset": "datasets",
    "model": "models (zoo)",
    "generator": "generators",
    "synthesis method": "synthesis methods",
    "loss term": "synthesis loss terms",
    "student term": "student terms",
    "online method": "online methods",
    "variation model": "variation models",
    "key map": "key maps",
}


def names(kind: str) -> list[str]:
    """The names the index declares for one registry kind, sorted."""
    return sorted(INDEX[kind])


def serving(task: str) -> list[str]:
    """The methods (synthesis and online) that serve a ``task`` teacher, from the index alone."""
    every = online_methods()
    return every if task == "classification" else sorted(m for m in every if task in TASKS_SERVED.get(m, ()))


def online_methods() -> list[str]:
    """``dfkd distill --online`` takes a feed of its own (DFAD) or any synthesis method in the loop."""
    return sorted(set(INDEX["online method"]) | set(INDEX["synthesis method"]))


#: the methods that serve a teacher without BatchNorm (named by every refusal of one that needs it)
WITHOUT_BN = ("dafl (dfkd synthesize -m dafl), published dfad (dfkd distill --online dfad), dfnd (dfkd retrieve), "
              "or any method with --set weights.bn=0")
