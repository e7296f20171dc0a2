import torch

from world import models
from world.sd_shaped import SD14_TEXT_WIDTH, write_sd14_shaped_pipeline


def test_world_unet_has_sd_transformer_blocks_everywhere():
    unet = models.make_unet()
    blocks = [m for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) >= 5
    for block in blocks:
        assert block.attn2 is not None and block.ff is not None
    assert unet.config.cross_attention_dim == models.TEXT_WIDTH


def test_world_vae_maps_32px_to_8x8x4_latents():
    vae = models.make_vae().eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, models.LATENT_CHANNELS, models.LATENT_SIZE, models.LATENT_SIZE)


def test_sd14_shaped_pipeline_has_sd_sizes(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(write_sd14_shaped_pipeline(tmp_path / "sd")))
    assert pipe.text_encoder.config.hidden_size == SD14_TEXT_WIDTH
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.cross_attention_dim == SD14_TEXT_WIDTH
    assert pipe.unet.config.down_block_types[-1] == "DownBlock2D"
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    image = pipe("a nude circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
