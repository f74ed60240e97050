"""An offline diffusion prior for ``dfkd augment``: a small diffusers ``UNet2DModel`` trained on a wild pool.

Why it exists: DDA makes image variations with Stable Diffusion, which needs a GPU and a hub download. The CPU
default pipeline needs a variation model that carries real image knowledge without touching the teacher's data,
so we train a small DDPM on the unlabeled offline wild pool (DFND's pool: scikit-learn digits, photo crops and
noise; no MNIST image) and make variations the SDEdit way: noise a source up to ``strength x T`` and denoise it.

SDEdit only ever starts from ``t <= strength x T``, so the prior is trained on those noise levels alone
(``t_max``): the network's capacity and the training time go where they are used. The result is saved in the
diffusers ``DDPMPipeline.save_pretrained`` layout (``unet/``, ``scheduler/``, ``model_index.json``) plus a
``dfkd_prior.json`` with what it was trained on, so ``DDPMPipeline.from_pretrained(dir)`` loads it anywhere.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dfkd_common.errors import DfkdError
from dfkd_common.extras import need

PRIOR_INFO = "dfkd_prior.json"


@dataclass(frozen=True)
class PriorConfig:
    """How the prior is built and trained; every field is recorded in ``dfkd_prior.json``."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 64])  # 1.6 M parameters at 32x32
    attention: list[bool] = field(default_factory=lambda: [False, True, False])
    layers_per_block: int = 2
    timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    t_max: float = 0.7  # train only t < t_max x T: SDEdit strengths up to 0.7 are served
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 200
    steps: int = 0  # 0: as many as fit in `minutes` (measured after a short warm-up)
    minutes: float = 5.0
    ema_decay: float = 0.999
    amp: Literal["auto", True, False] = "auto"
    seed: int = 0


def build_unet(image_size: int, channels: int, cfg: PriorConfig) -> Any:
    """The prior's network: a diffusers UNet2DModel sized for small banks."""
    need("diffusers", "the offline diffusion prior")
    from diffusers import UNet2DModel

    if len(cfg.widths) != len(cfg.attention):
        raise DfkdError("prior: widths and attention must have the same length")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.widths),
        down_block_types=down, up_block_types=up, norm_num_groups=min(16, min(cfg.widths)),
    )


def build_scheduler(cfg: PriorConfig) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule)


def train_prior(images: torch.Tensor, out_dir: Path, cfg: PriorConfig, device: torch.device,
                source: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """Train the prior on uint8 images (N, C, H, W) and save it under ``out_dir``; returns the training record.

    The images sit on the device as uint8 (a 48k-image 32x32 pool is 49 MB) and every batch is drawn there, so
    the GPU never waits for a loader. Weights saved are the EMA's, as in every DDPM recipe.
    """
    from diffusers import DDPMPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from dfkd_common.engine import Engine, seed_everything

    if images.ndim != 4 or images.dtype != torch.uint8:
        raise DfkdError("prior: expected uint8 images (N, C, H, W)")
    n, c, h, w = images.shape
    if h != w:
        raise DfkdError(f"prior: square images expected, got {h}x{w}")
    if not 0.0 < cfg.t_max <= 1.0:
        raise DfkdError(f"prior: t_max must be in (0, 1], got {cfg.t_max}")
    seed_everything(cfg.seed)
    unet = build_unet(h, c, cfg).to(device)
    scheduler = build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    ema.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    engine = Engine.create(device, amp=cfg.amp, channels_last=False, where="prior amp")  # precision: the engine's
    data = images.to(device)
    t_hi = max(1, int(cfg.t_max * cfg.timesteps))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def step(lr_sched: Any | None) -> float:
        idx = torch.randint(0, n, (cfg.batch_size,), device=device, generator=gen)
        x0 = data[idx].float().div_(127.5).sub_(1.0)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, t_hi, (cfg.batch_size,), device=device, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        with engine.autocast():
            pred = unet(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        if not torch.isfinite(loss):
            raise DfkdError("prior: the training loss is not finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        ema.step(unet.parameters())
        return float(loss.detach())

    start = time.perf_counter()
    total = cfg.steps
    if total <= 0:  # measure, then fit the schedule into the time budget
        for _ in range(10):  # untimed: the first steps pay for kernel selection and allocator growth
            step(None)
        probe = 40
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(probe):
            step(None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - tick) / probe
        total = max(100, int((cfg.minutes * 60 - (time.perf_counter() - start)) / per_step))
        log(f"prior: {per_step * 1000:.1f} ms per step of {cfg.batch_size}: {total} steps fit {cfg.minutes} min")
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, total)
    curve: list[tuple[int, float]] = []
    running = 0.0
    every = max(1, total // 50)
    for i in range(total):
        running += step(lr_sched)
        if (i + 1) % every == 0:
            curve.append((i + 1, running / every))
            log(f"prior step {i + 1}/{total}: loss {running / every:.4f}")
            running = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    unet = unet.to("cpu").float()
    out_dir.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir)
    record = {
        "kind": "dfkd-sdedit-prior", "config": asdict(cfg), "steps": total, "images_seen": total * cfg.batch_size,
        "seconds": round(seconds, 1), "device": describe_device(device), "precision": "bf16" if engine.amp else "fp32",
        "parameters": sum(p.numel() for p in unet.parameters()), "image_shape": [c, h, w],
        "trained_on": source, "loss_curve": curve,
        "final_loss": curve[-1][1] if curve else math.nan,
    }
    (out_dir / PRIOR_INFO).write_text(json.dumps(record, indent=2) + "\n")
    return record


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_prior_like(prior: Path, out: Path, seed: int = 0) -> Path:
    """A prior of ``prior``'s architecture and scheduler with freshly initialised weights, saved to ``out``: the
    control that shows what the trained weights add (issue 17's quality bar)."""
    need("diffusers", "the offline diffusion prior")
    import shutil

    from diffusers import DDPMPipeline, UNet2DModel

    trained = DDPMPipeline.from_pretrained(prior)
    torch.manual_seed(seed)
    DDPMPipeline(unet=UNet2DModel.from_config(trained.unet.config), scheduler=trained.scheduler).save_pretrained(out)
    if (prior / PRIOR_INFO).is_file():
        shutil.copy(prior / PRIOR_INFO, out / PRIOR_INFO)
    return out
