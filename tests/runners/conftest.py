"""Config composition for runner tests: the real Hydra configs, pointed at a temporary store and tiny settings."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

FAKE_JUDGE = {"from_concept": False, "handler": "tests.runners.fakes.FakeJudge"}
FAKE_EVALUATOR = {"handler": "tests.runners.fakes.FakeEvaluator"}


def compose_config(overrides: list[str] | None = None) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def tiny_config(tmp_path: Path, sd14_shaped_folder: Path) -> Callable[..., dict[str, Any]]:
    """The default config on the SD-shaped random pipeline: 3 prompts per set, 2 steps, fake judge and evaluator."""

    def make(*overrides: str, prompts: int = 3) -> dict[str, Any]:
        cfg = compose_config(["concept=world_nudity", "crt=none", "attack=none", *overrides])
        cfg["model"].update(path=str(sd14_shaped_folder), fallback_path=None, max_prompts_per_set=prompts,
                            evaluator=dict(FAKE_EVALUATOR))
        cfg["model"]["generation"].update(steps=2, height=64, width=64, batch_size=4)
        cfg["judge"] = dict(FAKE_JUDGE)
        cfg["store"]["root"] = str(tmp_path / "store")
        cfg["results"]["dir"] = str(tmp_path / "results")
        cfg["data"]["downloads"] = str(tmp_path / "downloads")
        cfg["metric"]["bootstrap"]["n_boot"] = 100
        cfg["progress"] = False
        cfg["skip_committed"] = False  # these tests rerun from the store; tests/test_run_cli.py covers the skip
        return cfg

    return make


def plugin(cfg: dict[str, Any], group: str, handler: str, name: str, **params: Any) -> dict[str, Any]:
    """Swap a CRT or attack for a test plug-in (the same `handler` + `params` form as conf/crt/*.yaml)."""
    cfg[group] = {"name": name, "handler": handler, "params": params, **({"adaptive": False} if group == "attack"
                                                                          else {})}
    return cfg


def full_disk_fdopen(real_fdopen: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``os.fdopen`` whose files refuse every write with ENOSPC, as on a full disk."""

    class FullFile:
        def __init__(self, handle: int, mode: str, *args: Any, **kwargs: Any):
            self.file = real_fdopen(handle, mode, *args, **kwargs)

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def fileno(self) -> int:
            return self.file.fileno()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    return FullFile


def assert_nothing_fitted(root: str | Path) -> None:
    """No artifact in the store and no file left in its staging folder: a refused fit stored nothing half-made."""
    from runners.store import Store

    root = Path(root)
    assert Store(root).count("artifact") == 0
    assert not list((root / "objects").glob("artifact/*")) if (root / "objects").is_dir() else True
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file()] if (root / "tmp").is_dir() else True
