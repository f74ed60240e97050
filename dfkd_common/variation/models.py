"""Variation models for ``dfkd augment``, registered by name: each turns source images into k variations.

A variation model only has to say what it works at (``channels``, ``size``), who it is (``identity``: recorded in
the augmented bank's provenance and in the job's resume key) and :meth:`VariationModel.vary`. Everything else
(banks, teacher filter, resume) is :mod:`dfkd_common.augment`'s, so a new model is one class here.

* ``sd-image-variations``: DDA's model, diffusers' ``StableDiffusionImageVariationPipeline`` (SD 1.4 conditioned
  on CLIP ViT-L/14 image embeddings; published model ``lambdalabs/sd-image-variations-diffusers``, revision
  ``v2.0``). Needs a GPU in practice and the weights on disk or from the hub.
* ``sdedit-prior``: the offline prior (:mod:`dfkd_common.variation.prior`), a small ``DDPMPipeline`` that makes
  variations the SDEdit way: noise the source to ``strength x T``, then denoise deterministically (DDIM, eta 0).
  It works on a CPU and carries real image knowledge from an unlabeled wild pool.

Randomness is per variation: ``vary`` takes one ``torch.Generator`` per output image, which the caller seeds
from (seed, source row, variation number). A variation therefore does not depend on the batch it was made in,
so a resumed run makes exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from dfkd_common.config import parse, values
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.registry import Registry

VARIATIONS: Registry[type[VariationModel]] = Registry("variation model")
INDEX = "model_index.json"
HASH_LIMIT = 256 << 20  # files larger than this enter a model's fingerprint by name and size only


@dataclass(frozen=True)
class NoParams:
    """A variation model without params."""


class VariationModel:
    """What ``dfkd augment`` needs of an image-variation model (see the module docstring)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers pipeline class in the directory's model_index.json
    default_source: ClassVar[str | None] = None  # what the bare name loads (a hub id), if anything
    Config: ClassVar[type] = NoParams  # the model's params (``augment.variation`` in params.yaml)

    channels: int
    size: int

    def __init__(self, source: str, device: torch.device, params: Mapping[str, Any]) -> None:
        self.source = source
        self.device = device
        self.cfg: Any = self.config(params)
        self.params = values(self.cfg)  # as recorded (identity)

    @classmethod
    def config(cls, params: Mapping[str, Any] | None) -> Any:
        """The model's params over its defaults; an unknown key or a wrong type is one error line."""
        return parse(cls.Config, params, f"variation model {cls.name}: augment.variation")

    @classmethod
    def check(cls, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """The model's params with defaults filled in, as plain values (checked as :meth:`config`)."""
        return values(cls.config(params))

    def identity(self) -> dict[str, Any]:
        """Who made the variations: name, source, fingerprint and params (provenance and resume key)."""
        path = Path(self.source)
        return {"model": self.name, "source": self.source,
                "fingerprint": fingerprint(path) if path.is_dir() else f"hub:{self.source}",
                "params": self.params}

    def vary(self, images: torch.Tensor, k: int, generators: list[torch.Generator]) -> torch.Tensor:
        """``k`` variations of each image, source-major (B*k, channels, size, size), floats in [0, 1].

        ``images``: floats in [0, 1], already at the model's channels and size; ``generators``: one CPU generator
        per output (noise is drawn on the CPU and moved, so a GPU and a CPU start from the same noise).
        """
        raise NotImplementedError

    def precision(self) -> str:
        return "fp32"


def fingerprint(path: Path) -> str:
    """SHA-256 over a model directory's files (names, sizes, and contents up to ``HASH_LIMIT`` each).

    Multi-GB weights enter by name and size only, so identifying a Stable Diffusion snapshot takes no minute.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= HASH_LIMIT:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def pipeline_class_of(path: Path) -> str:
    """The diffusers pipeline class a directory holds; one error line when it holds none."""
    index = path / INDEX
    if not index.is_file():
        raise DfkdError(f"variation model {path}: not a diffusers pipeline directory (no {INDEX})")
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DfkdError(f"variation model {path}: {INDEX} is not a diffusers model index") from None


def open_variation_model(spec: str, device: torch.device, params: dict[str, Any] | None = None) -> VariationModel:
    """A variation model from ``NAME``, ``NAME:PATH_OR_HUB_ID`` or a diffusers pipeline directory.

    A directory is matched to the registered model whose pipeline class its ``model_index.json`` names; a name
    alone loads the model's default source (``sd-image-variations``: the published hub id, which needs the
    weights in the local Hugging Face cache or a network).
    """
    name, sep, rest = spec.partition(":")
    if sep and name in VARIATIONS:
        cls, source = VARIATIONS.get(name), rest
    elif spec in VARIATIONS:
        cls = VARIATIONS.get(spec)
        if cls.default_source is None:
            raise DfkdError(f"variation model {spec} needs a directory: --model {spec}:PATH")
        source = cls.default_source
    else:
        path = Path(spec)
        if not path.exists():
            raise DfkdError(f"variation model {spec}: no such directory, and not a registered name "
                            f"({', '.join(VARIATIONS.names())})")
        if not path.is_dir():
            raise DfkdError(f"variation model {spec}: not a directory (a diffusers pipeline directory expected)")
        found = pipeline_class_of(path)
        match = [VARIATIONS.get(n) for n in VARIATIONS.names() if VARIATIONS.get(n).pipeline_class == found]
        if not match:
            expected = ", ".join(f"{VARIATIONS.get(n).pipeline_class} ({n})" for n in VARIATIONS.names())
            raise DfkdError(f"variation model {spec} is a {found}; expected one of: {expected}")
        cls, source = match[0], spec
    path = Path(source)
    if path.is_dir():
        found = pipeline_class_of(path)
        if found != cls.pipeline_class:
            raise DfkdError(f"variation model {source} is a {found}, not a {cls.pipeline_class} ({cls.name})")
    elif sep or path.exists() or source.startswith((".", "/")):
        raise DfkdError(f"variation model {source}: no such directory")
    return cls(source, device, cls.check(params or {}))


def quiet_hub_libraries() -> None:
    """diffusers/transformers log loading chatter and progress bars to stderr; a stage's stderr is for errors."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - the prior needs diffusers only
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _load_error(source: str, exc: BaseException) -> DfkdError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DfkdError(f"cannot load the variation model {source}: {first}")


@VARIATIONS.register("sdedit-prior")
class SDEditPrior(VariationModel):
    """SDEdit with a small DDPM (the offline prior): noise to ``strength x T``, then ``steps`` DDIM steps.

    Deterministic given the initial noise (DDIM with eta 0), which comes from the per-variation generators.
    ``strength`` above the ``t_max`` the prior was trained for is refused: those noise levels were never learned.
    """

    name = "sdedit-prior"
    pipeline_class = "DDPMPipeline"

    @dataclass(frozen=True)
    class Config:
        strength: float = 0.5  # SDEdit's: noise to strength x T
        steps: int = 10  # DDIM steps from there
        batch_size: int = 256  # the UNet's batch

    def __init__(self, source: str, device: torch.device, params: dict[str, Any]) -> None:
        super().__init__(source, device, params)
        need("diffusers", "the sdedit-prior variation model")
        quiet_hub_libraries()
        from diffusers import DDIMScheduler, DDPMPipeline

        strength, steps = self.cfg.strength, self.cfg.steps
        if not 0.0 < strength <= 1.0:
            raise DfkdError(f"variation.strength must be in (0, 1], got {strength}")
        if steps < 1:
            raise DfkdError(f"variation.steps must be >= 1, got {steps}")
        try:
            pipe = DDPMPipeline.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise _load_error(source, exc) from None
        info_path = Path(source) / "dfkd_prior.json"
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        t_max = float(self.info.get("config", {}).get("t_max", 1.0))
        if strength > t_max + 1e-9:
            raise DfkdError(f"variation.strength {strength} is above the noise levels this prior was trained on "
                            f"(t_max {t_max}): choose strength <= {t_max}")
        self.unet = pipe.unet.to(device).eval()
        self.channels = int(self.unet.config.in_channels)
        self.size = int(self.unet.config.sample_size)
        # img2img's convention: a schedule of steps/strength DDIM steps over [0, T), of which the last `steps`
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(max(steps, round(steps / strength)))
        self.timesteps = self.scheduler.timesteps[-steps:]
        self.batch = max(1, self.cfg.batch_size)

    @torch.inference_mode()
    def vary(self, images: torch.Tensor, k: int, generators: list[torch.Generator]) -> torch.Tensor:
        x0 = images.to(self.device).float().repeat_interleave(k, 0).mul(2).sub(1)
        if len(generators) != x0.shape[0]:
            raise ValueError("one generator per variation")
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(self.device)
        out = []
        for i in range(0, x0.shape[0], self.batch):  # the UNet's batch, independent of the caller's
            x = self.scheduler.add_noise(x0[i : i + self.batch], noise[i : i + self.batch], self.timesteps[:1])
            for t in self.timesteps:
                eps = self.unet(x, t.to(self.device)).sample
                x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
            out.append(x)
        return torch.cat(out).add(1).div(2).clamp(0, 1)


def _torch_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


@VARIATIONS.register("sd-image-variations")
class SDImageVariations(VariationModel):
    """DDA's Stable Diffusion image variations: one pipeline call per batch, the published preprocessing.

    Preprocessing as the model card's: resize to the image encoder's input (224 for CLIP ViT-L/14) with bicubic
    interpolation, normalise with the feature extractor's (CLIP) mean and std, and pass the tensor, which the
    pipeline then encodes as it is. Guidance 3 and 25 steps by default; fp16/bf16 on a GPU (``dtype: auto``);
    no safety checker (the outputs are training data for a classifier, filtered by the teacher).
    """

    name = "sd-image-variations"
    pipeline_class = "StableDiffusionImageVariationPipeline"
    default_source = "lambdalabs/sd-image-variations-diffusers"

    @dataclass(frozen=True)
    class Config:
        guidance: float = 3.0
        steps: int = 25
        revision: str | None = "v2.0"  # of a hub id (a directory has none)
        dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 on a GPU, fp32 on a CPU
        height: int | None = None  # None: the UNet's sample size
        width: int | None = None  # None: the height

    def __init__(self, source: str, device: torch.device, params: dict[str, Any]) -> None:
        super().__init__(source, device, params)
        need("diffusers", "the sd-image-variations variation model")
        need("transformers", "the sd-image-variations variation model")
        quiet_hub_libraries()
        from diffusers import StableDiffusionImageVariationPipeline

        self.dtype = _torch_dtype(self.cfg.dtype, device)
        revision = None if Path(source).is_dir() else self.cfg.revision
        try:
            pipe = StableDiffusionImageVariationPipeline.from_pretrained(
                source, revision=revision, dtype=self.dtype, safety_checker=None)
        except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
            raise _load_error(source, exc) from None
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        fe = pipe.feature_extractor
        crop = fe.crop_size  # a dict, or transformers 5's SizeDict
        self.encoder_size = int(getattr(crop, "height", None) or crop["height"] if not isinstance(crop, int) else crop)
        self.mean = torch.tensor(fe.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(fe.image_std, device=device).view(1, 3, 1, 1)
        self.channels = 3
        self.size = int(self.cfg.height or pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        if not Path(self.source).is_dir():
            ident["revision"] = self.cfg.revision
        return ident

    def precision(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")

    @torch.inference_mode()
    def vary(self, images: torch.Tensor, k: int, generators: list[torch.Generator]) -> torch.Tensor:
        x = images.to(self.device).float()
        x = F.interpolate(x, size=(self.encoder_size, self.encoder_size), mode="bicubic", align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.dtype)
        out = self.pipe(image=x, num_images_per_prompt=k, guidance_scale=self.cfg.guidance,
                        num_inference_steps=self.cfg.steps, generator=generators, output_type="pt",
                        height=self.size, width=self.cfg.width or self.size).images
        return out.float().clamp(0, 1)
