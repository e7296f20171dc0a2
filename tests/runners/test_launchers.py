"""``hydra/launcher=local``: submitit_local whose jobs, started together, get cores // jobs threads each."""

from __future__ import annotations

import os
from typing import Any

import pytest

from runners import launchers
from runners.launchers import THREAD_VARIABLES, ThreadCappedLocalLauncher, threads_per_job
from tests.runners.conftest import CONF


@pytest.mark.parametrize(("jobs", "cores", "requested", "expected"), [
    (2, 16, None, 8),
    (3, 16, None, 5),  # 15 of 16 cores: never more threads than cores
    (1, 16, None, 16),
    (2, 2, None, 1),
    (4, 2, None, 1),  # more jobs than cores: one thread each
    (2, 16, "2", 2),  # the user's smaller OMP_NUM_THREADS wins
    (2, 16, "12", 8),  # ...a larger one does not
    (2, 16, "", 8),
    (2, 16, "many", 8),
])
def test_threads_per_job_keep_jobs_times_threads_within_the_cores(jobs, cores, requested, expected):
    threads = threads_per_job(jobs, cores, requested)
    assert threads == expected
    assert jobs * threads <= cores or threads == 1


def test_the_jobs_start_with_the_thread_cap_in_their_environment_and_the_launcher_keeps_its_own(monkeypatch):
    seen: dict[str, Any] = {}

    def launch(self, job_overrides, initial_job_idx):  # where submitit starts the job processes
        seen.update({name: os.environ.get(name) for name in THREAD_VARIABLES}, jobs=len(job_overrides))
        return ["done"] * len(job_overrides)

    monkeypatch.setattr(launchers.SubmititLocalLauncher, "launch", launch)
    monkeypatch.setattr(launchers, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    returned = ThreadCappedLocalLauncher().launch([["crt=none"], ["crt=esd_x"], ["crt=uce"]], 0)
    assert returned == ["done"] * 3
    assert seen == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "jobs": 3}
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "7"


def test_the_local_preset_is_submitit_local_with_the_capping_launcher():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        local, plain = (OmegaConf.to_container(compose("config", overrides=[f"hydra/launcher={name}"],
                                                       return_hydra_config=True).hydra.launcher)
                        for name in ("local", "submitit_local"))
    assert local.pop("_target_") == "hydra_plugins.crt_bench_launcher.LocalLauncher"
    assert plain.pop("_target_").endswith("submitit_launcher.LocalLauncher")
    assert local == plain


APP = '''
import os

import hydra


@hydra.main(config_path="conf", config_name="app", version_base="1.3")
def main(cfg):
    with open(os.path.join(cfg.out, f"{cfg.n}.txt"), "w") as f:
        f.write(os.environ.get("OMP_NUM_THREADS", "unset"))


if __name__ == "__main__":
    main()
'''


def test_a_two_job_sweep_through_the_local_preset_gives_each_job_its_share(tmp_path):
    """A sweep of a tiny Hydra app (no torch to import) with the repository's launcher preset, end to end."""
    import subprocess
    import sys

    from runners.launchers import available_cores
    from tests.runners.conftest import ROOT

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.yaml").write_text(
        f"defaults:\n  - override hydra/launcher: local\n  - _self_\nout: {tmp_path}\nn: 0\n"
        f"hydra:\n  searchpath: [file://{CONF}]\n")
    (tmp_path / "app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", "n=0,1",
                             f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    share = str(threads_per_job(2, available_cores()))
    assert [(tmp_path / f"{n}.txt").read_text() for n in (0, 1)] == [share, share]
