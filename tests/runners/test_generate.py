"""Generation through the store: keys that follow every setting, batch-independent pixels, per-row guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crt_bench.spec import HarnessError
from runners.generate import ImageMaker, ImageRequest, base_system, tensor_sha256
from runners.models import PipelineCache
from runners.spec import GenerationSettings, PromptItem
from runners.store import Store, key_of


@pytest.fixture
def maker(sd14_shaped_folder, tmp_path):
    store = Store(tmp_path / "store")
    cfg = {"name": "sd14-shaped", "path": str(sd14_shaped_folder), "dtype": "float32", "device": "cpu"}
    handle = PipelineCache().open(cfg, tmp_path, store, "ddim")
    settings = GenerationSettings(steps=2, guidance=7.5, height=64, width=64, scheduler="ddim", batch_size=4)
    return ImageMaker(store, handle, settings, progress=False)


def test_pixels_do_not_depend_on_the_batch(maker):
    items = [PromptItem("a red circle", 1), PromptItem("a blue square", 2), PromptItem("a green ring", 3)]
    pipe = base_system(maker.model).defended.pipe
    together = maker.sample(pipe, [ImageRequest(i) for i in items], 7.5, "")
    alone = maker.sample(pipe, [ImageRequest(items[1])], 7.5, "")
    diff = np.abs(np.asarray(together[1], dtype=int) - np.asarray(alone[0], dtype=int)).max()
    assert diff <= 2  # one seeded generator per image; only float reassociation across batch sizes remains


def test_every_setting_that_changes_pixels_changes_the_key(maker):
    system = base_system(maker.model)
    request = ImageRequest(PromptItem("a red circle", 1))
    key = key_of(maker.image_spec(system, request))
    variants = [ImageRequest(PromptItem("a red circle", 5)), ImageRequest(PromptItem("a red circle", 1), index=1),
                ImageRequest(PromptItem("a blue circle", 1)), ImageRequest(PromptItem("a red circle", 1, 3.0)),
                ImageRequest(PromptItem("a red circle", 1), text="adversarial"),
                ImageRequest(PromptItem("a red circle", 1), embedding=torch.zeros(77, 768))]
    keys = {key_of(maker.image_spec(system, v)) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert key_of(maker.image_spec(system, ImageRequest(PromptItem("a red circle", 1, case="other")))) == key
    # image 1 of seed 1 and image 0 of seed 2 start from the same noise: the same image, stored once
    assert (key_of(maker.image_spec(system, ImageRequest(PromptItem("a red circle", 1), index=1)))
            == key_of(maker.image_spec(system, ImageRequest(PromptItem("a red circle", 2)))))
    for change in ({"steps": 3}, {"scheduler": "lms"}, {"height": 32}, {"negative_prompt": "blurry"}):
        other = ImageMaker(maker.store, maker.model, GenerationSettings(**{**maker.settings.__dict__, **change}))
        assert key_of(other.image_spec(system, request)) != key, change
    batch_only = ImageMaker(maker.store, maker.model, GenerationSettings(**{**maker.settings.__dict__,
                                                                            "batch_size": 1}))
    assert key_of(batch_only.image_spec(system, request)) == key


def test_row_guidance_is_used_unless_disabled(maker):
    request = ImageRequest(PromptItem("a red circle", 1, guidance=3.0))
    assert maker.guidance(request) == 3.0
    maker.row_guidance = False
    assert maker.guidance(request) == 7.5


def test_images_per_prompt_seeds_each_image(maker):
    maker.settings = GenerationSettings(**{**maker.settings.__dict__, "images_per_prompt": 3})
    requests = maker.requests([PromptItem("a red circle", 10)])
    assert [r.seed for r in requests] == [10, 11, 12]
    records = maker.make(base_system(maker.model), requests)
    assert len({r.key for r in records}) == 3
    assert maker.counters.images_generated == 3
    maker.make(base_system(maker.model), requests)
    assert maker.counters.images_generated == 3 and maker.counters.images_reused == 3


def test_unstored_sampling_keeps_request_order_across_guidance_groups(maker):
    red, blue = PromptItem("a red circle", 1, 9.0), PromptItem("a blue square", 2, 3.0)
    items = [red, blue, red]
    pipe = base_system(maker.model).defended.pipe
    images = maker.sample_unstored(pipe, [ImageRequest(i) for i in items], "")
    assert len(images) == 3 and maker.store.count("image") == 0
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[2]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def _sdxl_maker(sdxl_shaped_folder, tmp_path) -> ImageMaker:
    store = Store(tmp_path / "store_xl")
    cfg = {"name": "sdxl-shaped", "path": str(sdxl_shaped_folder), "dtype": "float32", "device": "cpu",
           "pipeline_class": "StableDiffusionXLPipeline", "backbone": "sdxl"}
    handle = PipelineCache().open(cfg, tmp_path, store, "euler")
    settings = GenerationSettings(steps=2, guidance=5.0, height=64, width=64, scheduler="euler", batch_size=4)
    return ImageMaker(store, handle, settings, progress=False)


def test_an_sd1_embedding_prompt_keeps_its_key(maker):
    """The pooled companion is keyed only when there is one: SD 1.x / 2.x embedding prompts keep their spec."""
    embedding = torch.arange(77 * 768, dtype=torch.float32).reshape(77, 768)
    request = ImageRequest(PromptItem("a red circle", 1), embedding=embedding)
    assert maker.image_spec(base_system(maker.model), request)["prompt"] == {"embedding_sha256": tensor_sha256(
        embedding)}
    with pytest.raises(HarnessError, match="only SDXL"):
        maker.sample(base_system(maker.model).defended.pipe,
                     [ImageRequest(PromptItem("x", 1), embedding=torch.zeros(77, 768), pooled=torch.zeros(768))],
                     7.5, "")


def test_an_sdxl_embedding_prompt_carries_its_pooled_embedding(sdxl_shaped_folder, tmp_path):
    """SDXL's UNet reads the pooled embedding too: the image is the pipeline's for both, the key names both, and an
    embedding without it is refused in one line."""
    from crt_bench.backbone import encode_text

    xl = _sdxl_maker(sdxl_shaped_folder, tmp_path)
    system = base_system(xl.model)
    pipe = system.defended.pipe
    with torch.no_grad():
        cond = encode_text(pipe, ["a red circle"])
    item = PromptItem("a red circle", 1)
    request = ImageRequest(item, embedding=cond.hidden[0], pooled=cond.pooled[0])
    [image] = xl.sample(pipe, [request], 5.0, "")
    [from_text] = xl.sample(pipe, [ImageRequest(item)], 5.0, "")
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(from_text, dtype=int)).max() <= 1
    other = ImageRequest(item, embedding=cond.hidden[0], pooled=cond.pooled[0] * 2)
    [changed] = xl.sample(pipe, [other], 5.0, "")
    assert not np.array_equal(np.asarray(changed), np.asarray(image))
    spec = xl.image_spec(system, request)["prompt"]
    assert spec == {"embedding_sha256": tensor_sha256(cond.hidden[0]), "pooled_sha256": tensor_sha256(cond.pooled[0])}
    assert key_of(xl.image_spec(system, request)) != key_of(xl.image_spec(system, other))
    with pytest.raises(HarnessError, match="needs its pooled embedding"):
        xl.sample(pipe, [ImageRequest(item, embedding=cond.hidden[0])], 5.0, "")
