import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.evaluators import EvaluatorUnavailable, HFClipEvaluator, OpenClipEvaluator, build_evaluator


def random_images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_hf_evaluator_on_a_world_shaped_folder(clip_dir):
    ev = HFClipEvaluator(clip_dir, device="cpu", batch_size=2)
    imgs = random_images(3)
    emb = ev.encode_images(imgs)
    txt = ev.encode_texts(["a nude circle", "a clean circle"])
    assert emb.shape == (3, 16) and txt.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    # no preprocessor_config.json: pixels must be (x/255)*2-1, exactly how the world CLIPs were trained
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        out = ev.model.get_image_features(pixel_values=pixels)
    ref = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(emb, ref / ref.norm(dim=-1, keepdim=True), atol=1e-5)
    # batching does not change results
    assert torch.allclose(emb, HFClipEvaluator(clip_dir, device="cpu", batch_size=32).encode_images(imgs), atol=1e-5)
    assert ev.logit_scale == pytest.approx(float(ev.model.logit_scale.detach().exp()))


def test_hf_identity_is_stable_and_machine_independent(clip_dir):
    ident = HFClipEvaluator(clip_dir, device="cpu").identity
    again = HFClipEvaluator(clip_dir, device="cpu").identity
    assert ident == again
    assert str(clip_dir) not in json.dumps(ident)
    assert ident["id"].startswith("hf/local:clip_eval@") and len(ident["weights_sha256"]) == 64
    assert ident["preprocess"]["mean"] == [0.5, 0.5, 0.5]


def test_build_evaluator_and_clear_errors(clip_dir, tmp_path):
    ev = build_evaluator({"backend": "hf", "path": str(clip_dir), "device": "cpu"})
    assert isinstance(ev, HFClipEvaluator)
    with pytest.raises(EvaluatorUnavailable, match="local folder"):
        HFClipEvaluator(tmp_path / "no_such_clip", device="cpu")
    with pytest.raises(EvaluatorUnavailable, match="ViT-L-14.*pretrained="):
        OpenClipEvaluator("ViT-L-14", pretrained=str(tmp_path / "missing.safetensors"), device="cpu")
    with pytest.raises(ValueError):
        build_evaluator({"backend": "bogus"})


def test_open_clip_backend_with_a_local_checkpoint(tmp_path):
    """A tiny open_clip architecture registered from JSON, saved and reloaded as a local ``pretrained`` file."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    ev = build_evaluator({"backend": "open_clip", "model": "tiny-test-clip", "pretrained": str(tmp_path / "weights.pt"),
                          "device": "cpu"})
    emb, txt = ev.encode_images(random_images(2)), ev.encode_texts(["nude", "clean"])
    assert emb.shape == (2, 16) and txt.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert ev.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert ev.identity["id"].startswith("open_clip/tiny-test-clip/local:weights.pt@")
