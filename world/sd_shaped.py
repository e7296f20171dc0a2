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


SD21_TEXT_WIDTH = 1024  # OpenCLIP ViT-H/14's text tower, as diffusers ships it (CLIPTextModel, 23 layers)
SDXL_TEXT_WIDTHS = (768, 1280)  # CLIP ViT-L/14 (penultimate layer) + OpenCLIP ViT-bigG/14 (penultimate, pooled)
SDXL_SCALING_FACTOR = 0.13025
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


def _tokenizer(folder: Path, pad_token: str | None = None):
    """The world's byte-level BPE as a CLIP tokenizer; SD 2.x / SDXL's OpenCLIP tokenizers pad with '!' (SD v1.4's
    with the end token), which changes where the padding states are: kept so plug-ins see the real layout."""
    from transformers import CLIPTokenizer

    build_tokenizer(folder)
    if pad_token is None:
        return CLIPTokenizer.from_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _clip_text(tokenizer, width: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or width, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(image_size: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), sample_size=image_size, scaling_factor=scaling_factor)


def write_sd21_shaped_pipeline(folder: str | Path, seed: int = 0, image_size: int = 64,
                               v_prediction: bool = False) -> Path:
    """A random pipeline with SD 2.1's shapes: the 1024-wide OpenCLIP-H text encoder (GELU, pad '!'), a UNet with
    linear projections in its transformers, per-level head widths and 1024-wide cross-attention, SD's VAE scaling.
    ``v_prediction``: the 768 model (``stabilityai/stable-diffusion-2-1``, DDIM, v-prediction); otherwise 2-1-base
    (PNDM, epsilon)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "tokenizer", pad_token="!")
    text_encoder = _clip_text(tokenizer, SD21_TEXT_WIDTH, heads=16, act="gelu", projection=None)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64), cross_attention_dim=SD21_TEXT_WIDTH, attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True, upcast_attention=v_prediction, norm_num_groups=32)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False)
    scheduler = (DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **schedule) if v_prediction
                 else PNDMScheduler(skip_prk_steps=True, **schedule))
    pipe = StableDiffusionPipeline(vae=_vae(image_size, SD14_SCALING_FACTOR), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_sdxl_shaped_pipeline(folder: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    """A random pipeline with SDXL's shapes: two text encoders (768-wide CLIP-L and 1280-wide OpenCLIP-bigG with
    its 1280 projection, both read at the penultimate layer, concatenated to 2048), pooled text embeddings and six
    added time ids (``addition_embed_type="text_time"``, 256 per id: 1280 + 6 x 256 = 2816 projected), SDXL's
    three-level UNet (no attention at the first level, several transformer layers deeper down), 0.13025 latent
    scaling and the Euler sampler. The refiner is out of scope."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "tokenizer")
    tokenizer_2 = _tokenizer(folder / "tokenizer_2", pad_token="!")
    text_encoder = _clip_text(tokenizer, SDXL_TEXT_WIDTHS[0], heads=12, act="quick_gelu")
    text_encoder_2 = _clip_text(tokenizer_2, SDXL_TEXT_WIDTHS[1], heads=20, act="gelu",
                                projection=SDXL_TEXT_WIDTHS[1])
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=SDXL_TEXT_WIDTHS[1] + SDXL_TIME_IDS * time_dim, norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(image_size, SDXL_SCALING_FACTOR), text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
