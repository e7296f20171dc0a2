"""Sweeps through Hydra's submitit launcher, the cluster path, run end to end where CI can run them.

`submitit_local` is the launcher code Slurm uses (one pickled job per run, each in its own process, results read
back from the job folders), with processes on this machine instead of nodes. The Slurm path itself runs against a
stand-in `sbatch`/`srun`/`sacct` that start the batch script's array tasks here, so the generated batch script, the
array submission and the job environment are those of a cluster.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runners.conftest import ROOT

WORLD_READY = all((ROOT / "world" / "weights" / part).exists()
                  for part in ("pipeline/model_index.json", "clip_eval", "judges/colour.safetensors"))
CONCEPTS = ("world_nudity", "world_violence")
# The cheapest run that still makes, scores and reports images: 2 prompts per set, 2 sampling steps, no CRT to fit,
# no attack to search, one thread per job.
TINY = ["crt=none", "attack=none", "model.max_prompts_per_set=2", "model.generation.steps=2", "threads=1",
        "progress=false", "metric.bootstrap.n_boot=20", "results.leaderboard=false", "skip_committed=false"]


def _sweep(tmp_path: Path, launcher: str, *overrides: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **(env or {})}
    args = [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", f"concept={','.join(CONCEPTS)}", *TINY,
            f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'results'}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=540, env=env)


def _job_ids(sweep_dir: Path) -> list[str]:
    """The job id each run saw (hydra.job.id, set by the launcher from the job's environment)."""
    from omegaconf import OmegaConf

    return [str(OmegaConf.load(sweep_dir / str(number) / ".hydra" / "hydra.yaml").hydra.job.id)
            for number in range(len(CONCEPTS))]


@pytest.mark.skipif(not WORLD_READY, reason="the miniature world's weights are not trained yet")
def test_a_two_job_sweep_through_submitit_local_lands_both_results(tmp_path: Path):
    start = time.perf_counter()
    result = _sweep(tmp_path, "submitit_local")
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    documents = {}
    for path in (tmp_path / "results" / "runs").glob("*.json"):
        document = json.loads(path.read_text())
        documents[document["config"]["concept"]["key"]] = document
        assert path.with_suffix(".parquet").is_file()
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # readable by the group sharing the folder
    assert sorted(documents) == sorted(CONCEPTS)
    for document in documents.values():
        assert document["metrics"]["effectiveness/judge_rate/unacceptable"]["n"] == 2
        assert document["counters"]["images_generated"] + document["counters"]["images_reused"] >= 6
    ids = _job_ids(tmp_path / "multirun")
    assert len(set(ids)) == 2 and all(i.isdigit() for i in ids)  # two submitit jobs, each its own process
    for number in range(len(CONCEPTS)):
        assert "images generated:" in (tmp_path / "multirun" / str(number) / "run.log").read_text()
    print(f"submitit_local, 2 jobs: {wall:.1f} s wall")


FAKE_SBATCH = """#!{python}
# A stand-in for Slurm's sbatch: records the batch script and runs each array task here, in the background.
import os, re, subprocess, sys, itertools
script = sys.argv[-1]
text = open(script).read()
log = os.environ["FAKE_SLURM_LOG"]
open(os.path.join(log, "sbatch_" + os.path.basename(script)), "w").write(text)
job = 1000 + len(os.listdir(log))
array = re.search(r"^#SBATCH --array=0-(\\d+)", text, re.M)
tasks = range(int(array.group(1)) + 1) if array else [None]
for task in tasks:
    env = dict(os.environ, SLURM_JOB_ID=str(job + 1 + (task or 0)), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0")
    if task is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task))
    subprocess.Popen(["bash", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
print(f"Submitted batch job {{job}}")
"""

FAKE_SRUN = """#!{python}
# A stand-in for srun: one task, its --output/--error patterns filled from the job's environment.
import os, sys
args, files = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
env = os.environ
fill = {{"%A": env.get("SLURM_ARRAY_JOB_ID", ""), "%a": env.get("SLURM_ARRAY_TASK_ID", ""),
        "%j": env["SLURM_JOB_ID"], "%t": "0"}}
for flag, pattern in files.items():
    for key, value in fill.items():
        pattern = pattern.replace(key, value)
    fd = os.open(pattern, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1 if flag == "--output" else 2)
os.execvp(args[0], args)
"""

FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
"""


def _fake_slurm(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)):
        (folder / name).write_text(text.format(python=sys.executable))
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.skipif(not WORLD_READY, reason="the miniature world's weights are not trained yet")
def test_the_slurm_preset_submits_one_array_whose_tasks_run_the_sweep(tmp_path: Path):
    fake = _fake_slurm(tmp_path / "bin")
    log = tmp_path / "slurm"
    log.mkdir()
    result = _sweep(tmp_path, "slurm", "stop_after=prompts", "hydra.launcher.partition=gpu",
                    env={"FAKE_SLURM_LOG": str(log), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    (script,) = [p.read_text() for p in log.glob("sbatch_*")]
    for flag in ("--array=0-1%2", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=48GB", "--time=240",
                 "--partition=gpu", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}" in script, flag
    assert "export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK > 0 ? SLURM_CPUS_PER_TASK : 1 ))" in script
    assert f"{sys.executable} -u -m submitit.core._submit" in script
    ids = _job_ids(tmp_path / "multirun")
    assert sorted(i.split("_")[1] for i in ids) == ["0", "1"] and len({i.split("_")[0] for i in ids}) == 1
    for number, concept in enumerate(CONCEPTS):
        assert f"prompt set {concept}/unacceptable: 2 prompts" in (
            tmp_path / "multirun" / str(number) / "run.log").read_text()


def test_the_slurm_preset_is_submitit_slurm_with_one_gpu_per_job():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        launchers = {name: OmegaConf.to_container(compose("config", overrides=[f"hydra/launcher={name}"],
                                                          return_hydra_config=True).hydra.launcher)
                     for name in ("slurm", "submitit_slurm", "submitit_local")}
    assert launchers["slurm"]["_target_"] == launchers["submitit_slurm"]["_target_"]
    assert launchers["slurm"]["_target_"].endswith("SlurmLauncher")
    assert launchers["submitit_local"]["_target_"].endswith("LocalLauncher")
    assert {k: launchers["slurm"][k] for k in ("gpus_per_node", "tasks_per_node", "nodes")} == {
        "gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1}
