#!/usr/bin/env bash
# Retrain the whole miniature world from fixed seeds on 2 cores; resumable (re-run to continue).
# Two one-thread stages run side by side; the UNet gets both cores alone (a 2-thread stage sharing the cores with
# another stage was measured 9x slower than alone).
set -euo pipefail
PY=${PYTHON:-python}
$PY -m world.train --stage tokenizer "$@"
$PY -m world.train --stage clip --threads 1 "$@" &
clip=$!
($PY -m world.train --stage vae --threads 1 "$@" && $PY -m world.train --stage judges --threads 1 "$@") &
vae=$!
wait $clip
wait $vae
$PY -m world.train --stage eval_clip --threads 2 "$@"
$PY -m world.train --stage unet --threads 2 "$@"
$PY -m world.reward --threads 1  # ShieldDiff's reward classifier (not a judge), about 4 CPU-min
$PY -m world.manifest
