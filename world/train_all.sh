#!/usr/bin/env bash
# Retrain the whole miniature world from fixed seeds on 2 cores; resumable (re-run to continue).
set -euo pipefail
PY=${PYTHON:-python}
$PY -m world.train --stage tokenizer "$@"
$PY -m world.train --stage clip --threads 1 "$@" &
clip=$!
($PY -m world.train --stage vae --threads 1 "$@" && $PY -m world.train --stage judges --threads 1 "$@") &
vae=$!
wait $clip $vae
$PY -m world.train --stage unet --threads 2 "$@" &
unet=$!
$PY -m world.train --stage eval_clip --threads 1 "$@"
wait $unet
