#!/usr/bin/env bash
# Soak test (not in CI): train the digits default while sending SIGTERM every INTERVAL seconds and
# resuming each time, then check that the final weights equal an uninterrupted run of the same steps
# and that metrics.jsonl has every training step exactly once.
#   scripts/soak.sh                 # ~10 min of interrupted training on 2 CPU cores, then the straight run
#   STEPS=600 INTERVAL=20 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-5500}
interval=${INTERVAL:-60}
out=${OUT:-runs/soak-$(date +%Y%m%d-%H%M%S)}
glowtrain=.venv/bin/glowtrain
sets=(--set "train.steps=$steps" --set train.log_every=1 --set train.checkpoint_every=500)

interrupted=0
resume=()
while true; do
  "$glowtrain" fit --out "$out/interrupted" --no-progress "${sets[@]}" "${resume[@]}" &
  pid=$!
  ( sleep "$interval" && kill -TERM "$pid" 2>/dev/null ) &
  timer=$!
  status=0
  wait "$pid" || status=$?
  kill "$timer" 2>/dev/null || true
  if [ "$status" -eq 0 ]; then break; fi
  if [ "$status" -ne 130 ]; then echo "soak: fit exited with $status" >&2; exit 1; fi
  interrupted=$((interrupted + 1))
  resume=(--resume auto)
done
echo "soak: finished after $interrupted interruptions; now the uninterrupted run"
"$glowtrain" fit --out "$out/straight" --no-progress "${sets[@]}"

.venv/bin/python - "$out" "$steps" "$interrupted" <<'PY'
import json, sys, torch
out, steps, interrupted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load = lambda run: torch.load(f"{out}/{run}/checkpoints/last.pt", weights_only=True)
a, b = load("interrupted"), load("straight")
same = all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
same_ema = all(torch.equal(a["ema"][k], v) for k, v in b["ema"].items())
lines = [json.loads(l) for l in open(f"{out}/interrupted/metrics.jsonl")]
logged = [m["step"] for m in lines if m["split"] == "train" and "bpd" in m]
contiguous = logged == list(range(1, steps + 1))
test = [m["bpd"] for m in lines if m["split"] == "test"][-1]
print(json.dumps({"steps": steps, "interruptions": interrupted, "weights_equal": same, "ema_equal": same_ema,
                  "metrics_contiguous_no_duplicates": contiguous, "final_test_bpd": test}))
sys.exit(0 if same and same_ema and contiguous else 1)
PY
