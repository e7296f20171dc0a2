"""Hydra entry point: one command from (model, concept, CRT, attack) to a scored, reproducible table.

    python run.py                                        # the whole pipeline on the miniature world
    python run.py crt=espresso attack=ringabell concept=nudity   # the real setup (GPU, hub or model.path=...)
    python run.py -m crt=none,espresso                   # a sweep (hydra/launcher=slurm for a cluster)

A user-fixable problem (missing weights, offline hub, incompatible CRT x attack) ends the run with one line on
stderr and exit status 2, not a traceback; in a sweep it ends that job only, and the sweep goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from attacks.base import IncompatibleAttack
from runners.models import HarnessError, PipelineCache
from runners.report import summarize_results
from runners.results import committed_result
from runners.stages import prepare, run_stages, torch_threads
from runners.validate import validate_config

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("run")

# One per process, passed explicitly: a Hydra sweep in this process loads each model once.
PIPELINES = PipelineCache()


def execute(cfg: DictConfig | dict, root: Path = ROOT, pipelines: PipelineCache | None = None) -> dict:
    """Run one configuration; returns the paths written and the counters (used by tests and sweeps)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    validate_config(plain)
    torch_threads(plain)
    run = prepare(plain, root, pipelines if pipelines is not None else PIPELINES)
    stop_after = plain.get("stop_after", "report")
    if plain.get("skip_committed", True) and stop_after == "report" and (done := committed_result(run)):
        log.info("skipped: this run's result is already committed (%s); skip_committed=false runs it again", done)
        log.info(run.counters.line())
        _print_summary(done, run, done.parent.parent / "leaderboard.md")
        return {"counters": run.counters, "outputs": {"results": str(done)}, "metrics": {}, "timings": {},
                "skipped": True}
    run_stages(run, stop_after)
    summary = {"counters": run.counters, "outputs": run.outputs, "metrics": run.metrics, "timings": run.timings}
    if run.outputs.get("results"):
        board = run.outputs.get("leaderboard_md")
        _print_summary(Path(run.outputs["results"]), run, Path(board) if board else None)
    return summary


def _print_summary(results: Path, run, leaderboard: Path | None) -> None:
    """This run's effectiveness, utility and robustness with intervals, then where the results went: what a user
    looks at first (the full table is in the leaderboard)."""
    print(summarize_results(results, run.store.root, leaderboard, run.counters.line()), flush=True)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        execute(cfg)
    except (HarnessError, IncompatibleAttack) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("this job of the sweep is skipped; the others go on")
            return
        sys.exit(2)


if __name__ == "__main__":
    main()
