"""A fit under the runner's bar reports each optimiser step with its loss, and fits the same artifact as without."""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from crt.base import FitContext
from crt.esd import ESD
from crt_bench import progress


def test_esd_reports_its_steps_and_loss_and_fits_the_same_artifact(sd14, concept, capsys):
    ctx = FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    quiet = ESD(method="x", iterations=3, ddim_steps=4, lr=1e-3).fit(ctx)
    assert capsys.readouterr().err == ""
    with progress.bar("fit esd_x") as opened:
        shown = ESD(method="x", iterations=3, ddim_steps=4, lr=1e-3).fit(ctx)
    assert opened.n == 3
    line = re.split(r"[\r\n]+", capsys.readouterr().err.strip())[-1]
    assert line.startswith("fit esd_x: 100%") and "3/3" in line and "step/s" in line
    assert f"loss={tqdm.format_num(opened.values['loss'])}" in line
    assert quiet.tensors.keys() == shown.tensors.keys()
    assert all(torch.equal(quiet.tensors[k], shown.tensors[k]) for k in quiet.tensors)
