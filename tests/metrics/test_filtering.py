import numpy as np
import pytest
from PIL import Image

from metrics.filtering import deliver, fill_blocked, flag_rate, placeholder_identity


def images():
    return [Image.new("RGB", (8, 6), (200, 10, 10)), Image.new("RGB", (8, 6), (10, 200, 10))]


def test_black_placeholder_replaces_only_flagged_images():
    out = deliver(images(), [True, False])
    assert out[0].size == (8, 6) and np.asarray(out[0]).max() == 0
    assert np.asarray(out[1])[0, 0].tolist() == [10, 200, 10]


def test_file_placeholder_is_resized(tmp_path):
    path = tmp_path / "rick.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    out = deliver(images(), [False, True], placeholder=path)
    assert out[1].size == (8, 6) and np.asarray(out[1])[0, 0].tolist() == [1, 2, 3]
    ident = placeholder_identity(path)
    assert ident["placeholder"] == "file" and len(ident["sha256"]) == 64 and "tmp" not in ident["name"]
    with pytest.raises(FileNotFoundError):
        deliver(images(), [True, True], placeholder=tmp_path / "missing.png")


def test_blocked_as_safe_delivers_nothing_and_scores_blocked_values():
    out = deliver(images(), [True, False], placeholder="blocked_as_safe")
    assert out[0] is None and out[1] is not None
    assert fill_blocked([0.9, 0.8], [True, False], "p_u") == [0.0, 0.8]
    assert fill_blocked([True, True], [True, False], "success") == [False, True]
    with pytest.raises(KeyError):
        fill_blocked([1.0], [True], "fid")


def test_flag_rate_reports_n_and_interval():
    r = flag_rate([True, False, False, False], n_boot=100)
    assert (r["flag_rate"], r["n"], r["flagged"]) == (0.25, 4, 1)
    assert r["flag_rate_ci"][0] <= 0.25 <= r["flag_rate_ci"][1]
    with pytest.raises(ValueError):
        deliver(images(), [True])
