"""Architectures of the miniature world: Stable Diffusion's own classes at a size a CPU can train.

Nothing here is a re-implementation: the generator is diffusers' ``AutoencoderKL`` and
``UNet2DConditionModel`` with transformers' ``CLIPTextModel``, assembled as a ``StableDiffusionPipeline``;
the two CLIPs are transformers ``CLIPModel``s. Only the sizes differ from SD v1.4.
"""

from __future__ import annotations

import torch
from torch import nn

from world import vocabulary as V
from world.scene import IMAGE_SIZE

TEXT_WIDTH = 128
LATENT_CHANNELS = 4
LATENT_SIZE = 8


def clip_config(vocab_size: int, eos_token_id: int, bos_token_id: int, width: int = TEXT_WIDTH, layers: int = 4,
                vision_width: int = 128, vision_layers: int = 4, projection_dim: int = 128):
    """A small CLIP whose text tower has SD's interface (77 positions, causal, last hidden state)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=projection_dim, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                          pad_token_id=eos_token_id, hidden_act="quick_gelu")
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=vision_width,
                              intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                              num_attention_heads=4, projection_dim=projection_dim, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                         norm_num_groups=16, sample_size=IMAGE_SIZE)


def make_unet(cross_attention_dim: int = TEXT_WIDTH):
    """SD's UNet layout scaled down: cross-attention (``attn2``) and feed-forward in every transformer block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(64, 128), layers_per_block=1,
                                cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8, norm_num_groups=32)


def make_scheduler(kind: str = "ddim"):
    """SD v1.4's noise schedule (scaled_linear 0.00085 -> 0.012 over 1000 steps)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        kw.pop("set_alpha_to_one")
        return DDPMScheduler(**kw)
    return DDIMScheduler(**kw)


JUDGE_FAMILIES: dict[str, tuple[str, ...]] = {
    "shape": V.SHAPES,
    "colour": V.COLOUR_LABELS,
    "style": V.STYLES,
    "band": ("no", "yes"),
    "blood": ("no", "yes"),
}


class AttributeJudge(nn.Module):
    """A small CNN that reads one attribute family off a 32x32 image (the world's NudeNet / ResNet-50)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64 * 4, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1], shape (B, 3, 32, 32); returns logits."""
        return self.head(self.features(images * 2 - 1).flatten(1))
