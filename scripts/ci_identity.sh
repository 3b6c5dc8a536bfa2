#!/usr/bin/env bash
# The refactor's identity check: a fixed-seed ancestry -> distill -> sweep of tune_spaces/ci.yaml through the
# CLI (Ray Train for both trainings, Ray Tune for the sweep), printed as sorted JSON of every trial's accuracies.
# Run it on the commit before a refactor and after; the two outputs must be byte-identical.
#   bash scripts/ci_identity.sh OUT.json
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: ci_identity.sh OUT.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
uri="sqlite:///$work/mlflow.db"
weit=.venv/bin/weit
$weit ancestry --dataset digits --depth 2 --width 32 --heads 2 --patch 2 --mlp-ratio 2 --epochs 10 --batch-size 32 --lr 0.003 --seed 0 \
  --workers 1 --cpus-per-worker 1 --threads 1 --storage "$work/ray" --out "$work/anc.safetensors" \
  --mlflow-uri "$uri" >"$work/log" 2>&1
$weit distill --teacher "$work/anc.safetensors" --dataset digits --n-templates 4 --block 16 --epochs 3 --batch-size 32 \
  --workers 1 --cpus-per-worker 1 --threads 1 --storage "$work/ray" --out "$work/bank.safetensors" \
  --mlflow-uri "$uri" >>"$work/log" 2>&1
$weit sweep --space tune_spaces/ci.yaml --bank "$work/bank.safetensors" --ancestry "$work/anc.safetensors" \
  --name identity --cpus-per-trial 1 --storage "$work/tune" --mlflow-uri "$uri" >>"$work/log" 2>&1 \
  || { tail -40 "$work/log"; exit 1; }
.venv/bin/python - "$uri" "$out" <<'PY'
import json, sys
import mlflow
from mlflow.tracking import MlflowClient
uri, out = sys.argv[1:]
c = MlflowClient(uri)
rows = {}
for exp in c.search_experiments():
    for r in c.search_runs([exp.experiment_id], max_results=5000):
        m = {k: round(v, 6) for k, v in r.data.metrics.items() if "acc" in k}
        if m:
            name = r.info.run_name if exp.name == "weit-sweep" else r.info.run_name.rsplit("-", 1)[0]
            rows[f"{exp.name}/{name}"] = dict(sorted(m.items()))
json.dump(dict(sorted(rows.items())), open(out, "w"), indent=1)
print(f"{len(rows)} runs -> {out}")
PY
