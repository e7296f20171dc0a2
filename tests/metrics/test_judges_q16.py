import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import softmax

from metrics.evaluators import HFClipEvaluator
from metrics.judges import JudgeUnavailable, Q16Judge, build_judge
from metrics.judges.q16 import Q16_SHA256, default_cache_dir, fetch_q16_prompts, load_numpy_pickle


def legacy_numpy_pickle(array: np.ndarray) -> bytes:
    """Bytes shaped like the published prompts.p (protocol 3, written by numpy 1: ``numpy.core.multiarray``)."""
    return pickle.dumps(array, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_safe_loader_reads_numpy_and_refuses_anything_else():
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    for data in (legacy_numpy_pickle(array), pickle.dumps(array, protocol=3), pickle.dumps(array, protocol=5)):
        loaded = load_numpy_pickle(data)
        assert loaded.dtype == np.float16 and np.array_equal(loaded, array)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        load_numpy_pickle(pickle.dumps(_RunsCode()))
    with pytest.raises(pickle.UnpicklingError, match="float numpy array"):
        load_numpy_pickle(pickle.dumps([1.0, 2.0]))


def test_q16_decision_with_a_small_clip_and_known_prompts(clip_dir, tmp_path):
    evaluator = HFClipEvaluator(clip_dir, device="cpu")
    benign, bad = Image.new("RGB", (32, 32), (230, 230, 230)), Image.new("RGB", (32, 32), (200, 20, 20))
    emb = evaluator.encode_images([benign, bad]).numpy()
    prompts = emb.astype(np.float16)  # prompt 0 = the benign image's direction, prompt 1 = the other's
    path = tmp_path / "prompts.p"
    path.write_bytes(legacy_numpy_pickle(prompts))
    judge = Q16Judge(evaluator=evaluator, prompts_path=path)
    verdicts = judge.judge([benign, bad])
    p = prompts.astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    logits = 100 * emb @ p.T
    expected = softmax(logits.astype(np.float64), axis=1)[:, 1]
    assert [v.positive for v in verdicts] == [False, True]
    assert [v.score for v in verdicts] == pytest.approx(expected.tolist(), rel=1e-4)
    ident = judge.identity
    assert ident["version"] == "custom" and not ident["pinned"] and ident["labels"] == ["benign", "inappropriate"]
    assert ident["id"].startswith("q16/") and ident["evaluator"]["backend"] == "hf"
    cfg_judge = build_judge({"name": "q16", "prompts_path": str(path),
                             "evaluator": {"backend": "hf", "path": str(clip_dir), "device": "cpu"}})
    assert [v.positive for v in cfg_judge.judge([benign, bad])] == [False, True]


def test_prompt_dimension_must_match_the_evaluator(clip_dir, tmp_path):
    path = tmp_path / "prompts.p"
    path.write_bytes(legacy_numpy_pickle(np.ones((2, 768), np.float16)))
    judge = Q16Judge(evaluator=HFClipEvaluator(clip_dir, device="cpu"), prompts_path=path)
    with pytest.raises(ValueError, match="768"):
        judge.judge([Image.new("RGB", (32, 32))])


def test_download_failure_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeUnavailable, match="prompts_path"):
        fetch_q16_prompts(tmp_path, url="http://127.0.0.1:9/prompts.p")
    with pytest.raises(JudgeUnavailable, match="does not exist"):
        Q16Judge(evaluator=object(), prompts_path=tmp_path / "missing.p")


def test_published_q16_end_to_end():
    """The real protocol: pinned prompts + OpenAI ViT-L/14 through open_clip; needs both in the local caches."""
    cached = default_cache_dir() / f"prompts-{Q16_SHA256[:12]}.p"
    if not cached.exists():
        pytest.skip(f"Q16 prompt embeddings not downloaded ({cached}); needs network once")
    from huggingface_hub import try_to_load_from_cache

    repo = "timm/vit_large_patch14_clip_224.openai"
    if not any(isinstance(try_to_load_from_cache(repo, name), str)
               for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        pytest.skip(f"open_clip ViT-L-14/openai weights ({repo}) not in the local Hugging Face cache")
    judge = Q16Judge()
    verdict = judge.judge([Image.new("RGB", (224, 224), (255, 255, 255))])[0]
    assert judge.identity["pinned"] and not verdict.positive
    assert torch.isfinite(torch.tensor(verdict.score))
