import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from metrics.fid import FeatureNetworkUnavailable, fid_kid, world_feature_extractor


def solids(colours) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), tuple(int(v) for v in c)) for c in colours]


def mean_rg(images: torch.Tensor) -> torch.Tensor:
    """A 2-d feature network: mean red and green of each image, in [0, 1]."""
    return images.mean(dim=(2, 3))[:, :2]


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, written out with scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_with_a_custom_feature_network_matches_the_closed_form():
    rng = np.random.default_rng(0)
    real_c = rng.integers(0, 256, size=(40, 3))
    fake_c = np.clip(real_c[:30] * 0.3 + 170, 0, 255).astype(int)
    real, fake = solids(real_c), solids(fake_c)
    result = fid_kid(real, fake, feature=mean_rg, kid_subsets=20, batch_size=16)
    expected = reference_fid(real_c[:, :2] / 255.0, fake_c[:, :2] / 255.0)
    assert result["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert (result["n_real"], result["n_fake"], result["kid_subset_size"]) == (40, 30, 30)
    assert result["kid_mean"] > 0 and result["feature"]["id"] == "custom/_CallableFeatures"
    again = fid_kid(real, fake, feature=mean_rg, kid_subsets=20, batch_size=7)
    assert again["kid_mean"] == pytest.approx(result["kid_mean"]) and again["fid"] == pytest.approx(result["fid"])


def test_world_feature_network(clip_dir):
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, size=(24, 3))
    images = [Image.new("RGB", (32, 32), tuple(int(v) for v in c)) for c in colours]
    shifted = [Image.new("RGB", (32, 32), (int(c[0]) // 4, 255, int(c[2]) // 4)) for c in colours]
    net = world_feature_extractor(clip_dir)
    assert net.num_features == 16 and net.identity["id"].startswith("clip-image/local:clip_eval@")
    same = fid_kid(images, images, feature=net, kid_subsets=10)
    different = fid_kid(images, shifted, feature=net, kid_subsets=10)
    assert abs(same["fid"]) < 1e-3 * max(1.0, different["fid"]) and different["fid"] > 10 * abs(same["fid"])
    assert different["kid_mean"] > same["kid_mean"]
    assert same["feature"]["weights_sha256"] == net.identity["weights_sha256"]


def test_inception_path_works_or_fails_clearly():
    images = solids([(0, 0, 0), (255, 255, 255), (128, 0, 0)])
    try:
        result = fid_kid(images, images, feature="inception", kid_subsets=2)
    except FeatureNetworkUnavailable as err:
        assert "torch-fidelity" in str(err) and "inception_weights" in str(err)
    else:
        assert np.isfinite(result["fid"])


def test_input_validation():
    with pytest.raises(ValueError, match="two images"):
        fid_kid(solids([(0, 0, 0)]), solids([(1, 1, 1), (2, 2, 2)]), feature=mean_rg)
    mixed = [Image.new("RGB", (16, 16)), Image.new("RGB", (8, 8))]
    with pytest.raises(ValueError, match="share a size"):
        fid_kid(mixed, mixed, feature=mean_rg)
