"""A tiny, randomly initialised Stable Diffusion image-variation pipeline, built from configs and saved to disk.

Why: nothing may be downloaded in tests, the default pipeline or the GPU check, yet ``sd-image-variations`` must be
exercised through the real diffusers code path (``save_pretrained`` -> ``from_pretrained(path)`` -> one pipeline
call per batch). diffusers' own tests do the same: the published architecture (UNet2DConditionModel with cross
attention on a CLIP image embedding, AutoencoderKL, CLIPVisionModelWithProjection, PNDM) at toy widths. Its
images are noise; it checks plumbing, shapes, dtypes and throughput, never quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dfkd_common.extras import need


def build_tiny_sd_variation(out: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a tiny ``StableDiffusionImageVariationPipeline`` under ``out`` (``2 * sample_size`` px output)."""
    need("diffusers", "the tiny Stable Diffusion pipeline")
    need("transformers", "the tiny Stable Diffusion pipeline")
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=4, layer_norm_eps=1e-5))
    processor = CLIPImageProcessor(crop_size=32, size=32)
    scheduler = PNDMScheduler(skip_prk_steps=True)
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=processor, requires_safety_checker=False)
    out = Path(out)
    pipe.save_pretrained(out)
    return out
