"""A random-weight pipeline with SD v1.4's shapes, written to a local folder in diffusers format.

It stands in for ``CompVis/stable-diffusion-v1-4`` where the hub cannot be reached: the same classes,
a 768-wide 77-token CLIP text encoder, 4-channel latents at 1/8 of the image size, SD's four-level UNet
block structure (cross-attention in the first three levels) and SD's PNDM scheduler. Depth, channel
counts and resolution are reduced so that the real-path loader and every CRT and attack run on it on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from world.tokenizer import build_tokenizer

SD14_TEXT_WIDTH = 768
SD14_SCALING_FACTOR = 0.18215


def write_sd14_shaped_pipeline(folder: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    """Write the pipeline into ``folder`` (created if missing) and return the folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=SD14_TEXT_WIDTH, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64), cross_attention_dim=SD14_TEXT_WIDTH, attention_head_dim=8,
        norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), sample_size=image_size, scaling_factor=SD14_SCALING_FACTOR)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
