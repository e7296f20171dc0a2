"""Test-wide settings: one CPU thread (a training job shares the machine) and the SD-v1.4-shaped pipeline folder."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CRT_BENCH_DATA", "/work/shared/data"))


@pytest.fixture(scope="session")
def sd14_shaped_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight pipeline with SD v1.4's classes and shapes, written once per session (about a second)."""
    from world.sd_shaped import write_sd14_shaped_pipeline

    return write_sd14_shaped_pipeline(tmp_path_factory.mktemp("sd14_shaped") / "pipeline")


@pytest.fixture(scope="session")
def sd21_shaped_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight pipeline with SD 2.1-base's classes and shapes (1024-wide OpenCLIP-H text)."""
    from world.sd_shaped import write_sd21_shaped_pipeline

    return write_sd21_shaped_pipeline(tmp_path_factory.mktemp("sd21_shaped") / "pipeline")


@pytest.fixture(scope="session")
def sdxl_shaped_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight pipeline with SDXL's classes and shapes (two text encoders, pooled embedding, time ids)."""
    from world.sd_shaped import write_sdxl_shaped_pipeline

    return write_sdxl_shaped_pipeline(tmp_path_factory.mktemp("sdxl_shaped") / "pipeline")
