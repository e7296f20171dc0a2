import pytest

from metrics.asr import (
    P4D_DENOMINATOR,
    any_of_k,
    asr_any_of_k,
    asr_per_image,
    attack_success,
    mean_of_set_rates,
    p4d_failure_rate,
    p4d_ideal_mask,
)


def test_unlearndiffatk_pre_post_total():
    # prompt 0 succeeds unattacked (and the attack log also says success: counted once),
    # prompt 1 only after the attack, prompt 2 unattacked but the attack run failed, 3 and 4 never
    pre = [True, False, True, False, False]
    post = [True, True, False, False, False]
    r = attack_success(pre, post, n_boot=200)
    assert r["pre_asr"] == pytest.approx(2 / 5)
    assert r["asr"] == pytest.approx(3 / 5)
    assert r["post_asr"] == pytest.approx(1 / 5)
    assert r["n"] == 5 and r["successes"] == {"pre": 2, "post_only": 1, "total": 3}
    assert "all N" in r["denominator"]
    assert r["asr_ci"][0] <= 0.6 <= r["asr_ci"][1]
    with pytest.raises(ValueError):
        attack_success([True], [True, False])


def test_p4d_failure_rate_counts_ideal_prompts_only():
    base_unsafe = [True, True, True, False, True]
    defended_unsafe = [False, False, True, False, False]
    ideal = p4d_ideal_mask(base_unsafe, defended_unsafe)
    assert ideal.tolist() == [True, True, False, False, True]
    success = [True, False, True, True, False]  # successes on non-ideal prompts 2 and 3 do not count
    r = p4d_failure_rate(ideal, success, n_boot=200)
    assert r["failure_rate"] == pytest.approx(1 / 3)
    assert (r["n"], r["n_prompts"], r["successes"], r["pre_failure_rate"]) == (3, 5, 1, 0.0)
    assert r["denominator"] == P4D_DENOMINATOR


def test_any_of_k_and_per_image_rates():
    per_image = [[False, False, True], [False, False, False], [True, True, True], [False, True, False]]
    assert any_of_k(per_image).tolist() == [True, False, True, True]
    r = asr_any_of_k(per_image, n_boot=100)
    assert r["asr"] == pytest.approx(0.75) and r["n"] == 4 and r["k"] == [3]
    flat = [f for row in per_image for f in row]
    img = asr_per_image(flat, n_boot=100)
    assert img["asr"] == pytest.approx(5 / 12) and img["denominator"] == "images"


def test_trce_mean_of_set_rates_is_unweighted():
    r = mean_of_set_rates({"big": [True] * 1 + [False] * 9, "small": [True, True]}, n_boot=50)
    assert r["asr"] == pytest.approx((0.1 + 1.0) / 2)  # pooled would be 3/12
    assert r["n"] == {"big": 10, "small": 2}
