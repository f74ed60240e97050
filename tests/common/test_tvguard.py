"""torchvision, transformers' CLIP image classes and diffusers' SD image-variation pipeline import and run.

On the development/CI machines torch is the CPU build and torchvision's PyPI wheel is CUDA-built, so its
compiled extension cannot load; dfkd_common.tvguard must make the imports work anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def test_guard_runs_before_torchvision_in_a_fresh_interpreter(fresh_python: Any) -> None:
    code = (
        "import stages.cli, torch, torchvision, torchvision.ops;"
        "from dfkd_common import tvguard;"
        "print(tvguard._state['patched'], hasattr(torch.ops.torchvision, 'nms'))"
    )
    out = fresh_python(code, check=True).stdout.split()
    patched, has_nms = out
    assert has_nms == "True"
    # where the compiled extension loads (matching builds), the guard must not have touched anything
    from dfkd_common.tvguard import _extension_path

    so = _extension_path()
    if so is not None:
        try:
            torch.ops.load_library(str(so))
            loads = True
        except (OSError, RuntimeError):
            loads = False
        assert patched == str(not loads)


def test_torchvision_datasets_and_transforms_work(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision import datasets, transforms

    ds = datasets.FakeData(size=3, image_size=(3, 8, 8), num_classes=2, transform=transforms.ToTensor())
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and 0 <= y < 2
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a" / "0.png")
    folder = datasets.ImageFolder(str(tmp_path), transform=transforms.Compose([transforms.Resize(4),
                                                                                transforms.PILToTensor()]))
    assert folder[0][0].shape == (3, 4, 4) and folder.classes == ["a"]


def tiny_image_variation_pipeline():
    """A Stable Diffusion image-variation pipeline with random weights, built from configs (offline)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=4, intermediate_size=37))
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True),
        feature_extractor=processor, safety_checker=None, requires_safety_checker=False,
    )


def test_diffusers_image_variation_pipeline_round_trips_and_runs(tmp_path: Path) -> None:
    from diffusers import StableDiffusionImageVariationPipeline
    from PIL import Image

    tiny_image_variation_pipeline().save_pretrained(tmp_path / "sdvar")
    pipe = StableDiffusionImageVariationPipeline.from_pretrained(tmp_path / "sdvar", safety_checker=None)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    out = pipe(image, height=32, width=32, num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=2,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3)
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
