"""The memory estimate: parameter counts against SD v1.4's, trained counts against hand counts, the live-bytes
counter and the attention kernel against hand-computed sizes, and the table's labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runners.memory import (
    ADAM_MOMENTS,
    GIB,
    LABEL,
    PLANS,
    SD14_SIZES,
    LiveBytes,
    Setting,
    Sizer,
    crt_config,
    estimate,
    markdown,
    networks_from_folder,
    traced_peak,
)
from runners.registry import available

SD14_COUNTS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
SD14_LEVELS = {320: 5, 640: 5, 1280: 6}  # transformer blocks per width: 2 down + 3 up (+ 1 mid at 1280)
TEXT_WIDTH = 768


@pytest.fixture(scope="module")
def sizer(sd14_shaped_folder) -> Sizer:
    setting = Setting(dtype=torch.float16, batch=8, height=512, width=512)
    return Sizer(networks_from_folder(sd14_shaped_folder, SD14_SIZES), setting)


def test_full_size_networks_on_the_meta_device_have_sd14_parameter_counts(sizer):
    assert sizer.counts == SD14_COUNTS
    unet = sizer.networks.build("unet")
    assert all(p.device.type == "meta" for p in unet.parameters())


def test_esd_x_trains_every_attn2_parameter_by_hand_count(sizer):
    # per block: to_q and to_out.0 C x C (+ C bias on to_out), to_k and to_v 768 x C
    by_hand = sum(n * (2 * c * c + c + 2 * TEXT_WIDTH * c) for c, n in SD14_LEVELS.items())
    assert by_hand == 43_962_560
    row = estimate("esd_x", sizer)
    assert row.trained == by_hand == row.edited
    (training,) = row.fit
    pipeline_bytes = 2 * sum(SD14_COUNTS.values())  # float16
    fp32_unet = 4 * SD14_COUNTS["unet"]
    assert sum(training.resident.values()) == pipeline_bytes + fp32_unet + ADAM_MOMENTS * 4 * by_hand
    assert 4 * by_hand < training.transient < 8 * GIB  # at least the fp32 gradients; activations of one image


def test_closed_form_crts_edit_the_cross_attention_keys_and_values_by_hand_count(sizer):
    by_hand = sum(n * 2 * TEXT_WIDTH * c for c, n in SD14_LEVELS.items())
    row = estimate("uce", sizer)
    assert row.trained == 0 and row.edited == by_hand == 19_169_280
    assert estimate("ca", sizer).trained == by_hand  # CA's default group: the same to_k / to_v


def test_live_bytes_counts_new_storages_until_they_are_freed():
    mib = 2 ** 20
    with LiveBytes() as live:
        x = torch.zeros(512, 512, device="meta")  # 1 MiB
        view = x.t()  # a view: no new storage
        y = x * 2  # 1 MiB
        y.add_(1)  # in place: no new storage
        del x, view  # the view held the storage; both gone now
        z = y + 1
    assert live.peak == 2 * mib and live.current == 2 * mib
    del y, z
    assert live.current == 0


def test_efficient_attention_never_holds_the_score_matrix():
    tokens, width = 4096, 8
    q, k, v = (torch.zeros(1, 1, tokens, width, device="meta", requires_grad=True) for _ in range(3))
    scores, one_tensor = tokens * tokens * 4, tokens * width * 4

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    peak = traced_peak(step)  # output, log-sum-exp, three gradients and the backward's own buffers
    assert 4 * one_tensor <= peak < 16 * one_tensor and peak < scores / 32


def test_every_crt_option_has_a_memory_plan():
    handlers = {name: crt_config(name)["handler"] for name in available("crt")}
    assert {name for name, handler in handlers.items() if handler not in PLANS} == set()


def test_the_table_labels_every_row_as_estimated(sizer):
    rows = [estimate(name, sizer) for name in ("none", "esd_x")]
    table = markdown(sizer, rows)
    body = [line for line in table.splitlines() if line.startswith("| none") or line.startswith("| esd_x")]
    assert len(body) == 2 and all(line.rstrip().endswith(f"| {LABEL} |") for line in body)
    assert "859,520,964" in table and "estimated" in table.splitlines()[0]
    none, esd = rows
    assert none.fit_peak is None and esd.inference.peak > none.inference.peak  # the defended UNet copy
    sliced = Sizer(sizer.networks, Setting(dtype=torch.float16, batch=8, height=512, width=512, vae_slicing=True))
    assert sliced.generation < sizer.generation  # one image through the VAE decoder at a time


@pytest.mark.parametrize("name", ["rece", "mace", "negative_prompt", "sld", "safree", "sd_safety_checker",
                                  "unsafe_diffusion", "sdd", "fmn", "advunlearn", "sa", "safegen"])
def test_the_baselines_plans_size_what_they_hold(sizer, name):
    """Guards hold nothing beyond the pipeline; SLD's three UNet rows need more than CFG's two once the VAE decode
    (8 images at once) no longer dominates; a filter adds its CLIP tower; RECE's validation renders hold a candidate
    UNet; MACE trains rank-1 factors only."""
    row, none, negative = estimate(name, sizer), estimate("none", sizer), estimate("negative_prompt", sizer)
    if name in ("sld", "safree"):
        sliced = Sizer(sizer.networks, Setting(dtype=torch.float16, batch=8, height=512, width=512, vae_slicing=True))
        assert row.inference.peak >= negative.inference.peak and row.fit_peak is None
        assert estimate(name, sliced).inference.peak > estimate("negative_prompt", sliced).inference.peak
    if name in ("sd_safety_checker", "unsafe_diffusion"):
        assert row.inference.peak > none.inference.peak and row.trained == 0
    if name == "rece":
        assert row.fit_peak is not None and row.trained == 0 and row.edited > 0
    if name == "mace":
        assert 0 < row.trained < row.edited / 100
    if name == "sa":  # the Fisher diagonal and the anchor: two more fp32 values per trained parameter
        assert row.fit_peak.resident["per-parameter statistics (fp32)"] == 2 * row.trained * 4
    if name == "safegen":
        assert 0 < row.trained < estimate("esd_x", sizer).trained * 2
    if name in ("sdd", "fmn"):  # SDD trains attn2 only but keeps an EMA teacher; FMN trains the whole UNet
        esd_x = estimate("esd_x", sizer)
        assert row.fit_peak.peak > none.inference.peak and (row.trained == esd_x.trained) == (name == "sdd")
    if name == "advunlearn":  # the text encoder's layers, not its token and position embeddings
        assert 0 < row.trained < sizer.counts["text_encoder"] and row.fit_peak.peak > none.inference.peak
