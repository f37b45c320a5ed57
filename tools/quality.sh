#!/usr/bin/env bash
# The quality table of docs/quality.md: every KV policy at kv_retention 0.7 / 0.5 / 0.3 and
# full (pyramid with prefill shrinking on and off, snapkv also with shrinking on, pyramid's
# reference config, and snapshrink), measured with pyramid-eval on the bundled model:
#   perplexity  P = 1024 prompt tokens, T = 256 teacher-forced tokens, $WINDOWS windows
#   passkey     prompts of about 1200 and 2200 tokens, $SAMPLES per length
# Appends one JSON line per run to $RESULTS (pyramid-eval --json plus "label" and
# "command"), skipping runs already there (so an interrupted run resumes), then renders
# the table into docs/quality.md with tools/quality_table.py.
#
# usage: tools/quality.sh [TEXT]   (default TEXT: ../shared/data/python_heldout_dev.txt)
# environment: PYRAMID_EVAL (default build/bin/pyramid-eval), RESULTS (default
#   build/quality/results.jsonl), WINDOWS (default 20), SAMPLES (default 20), THREADS
#   (default 0 = all), SEED (default 1), ONLY (a regular expression: run only the
#   configurations whose label matches; the table still shows everything in $RESULTS).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEXT=${1:-$ROOT/../shared/data/python_heldout_dev.txt}
EVAL=${PYRAMID_EVAL:-$ROOT/build/bin/pyramid-eval}
RESULTS=${RESULTS:-$ROOT/build/quality/results.jsonl}
WINDOWS=${WINDOWS:-20}
SAMPLES=${SAMPLES:-20}
THREADS=${THREADS:-0}
SEED=${SEED:-1}
ONLY=${ONLY:-.}

[[ -x $EVAL ]] || { echo "quality.sh: $EVAL not found; build the pyramid-eval target" >&2; exit 1; }
[[ -r $TEXT ]] || { echo "quality.sh: cannot read the text '$TEXT'" >&2; exit 1; }
mkdir -p "$(dirname "$RESULTS")"
touch "$RESULTS"

# label|policy flags. The label is the table's first column.
CONFIGS=("full|--kv-policy full"
         "pyramid rho 0.9 (reference config)|--kv-policy pyramid --kv-prefill-shrink on")
for t in 0.7 0.5 0.3; do
  CONFIGS+=("pyramid $t|--kv-policy pyramid --kv-retention $t --kv-prefill-shrink on"
            "pyramid $t, no shrink|--kv-policy pyramid --kv-retention $t --kv-prefill-shrink off"
            "streaming $t|--kv-policy streaming --kv-retention $t"
            "h2o $t|--kv-policy h2o --kv-retention $t"
            "snapkv $t|--kv-policy snapkv --kv-retention $t"
            "pyramidkv $t|--kv-policy pyramidkv --kv-retention $t"
            "snapshrink $t|--kv-policy snapshrink --kv-retention $t")
  # Prefill shrinking is what costs snapkv its retrieval, and what snapshrink defers: both ways.
  [[ $t == 0.5 ]] && CONFIGS+=("snapkv 0.5, prefill shrinks|--kv-policy snapkv --kv-retention 0.5 --kv-prefill-shrink on"
                               "snapshrink 0.5, no shrink|--kv-policy snapshrink --kv-retention 0.5 --kv-prefill-shrink off")
done

have() {  # have LABEL MODE: is this run in $RESULTS already?
  python3 - "$RESULTS" "$1" "$2" <<'EOF'
import json, sys
path, label, mode = sys.argv[1:]
found = any(l.strip() and (lambda r: r["label"] == label and r["mode"] == mode)(json.loads(l))
            for l in open(path, encoding="utf-8"))
sys.exit(0 if found else 1)
EOF
}

run() {  # run LABEL MODE ARGS...: one pyramid-eval run appended to $RESULTS
  local label=$1 mode=$2; shift 2
  if have "$label" "$mode"; then echo "quality.sh: $label / $mode: in $RESULTS already" >&2; return; fi
  local cmd=("$EVAL" --text "$TEXT" --seed "$SEED" --threads "$THREADS" --json --quiet "$@")
  local t0=$SECONDS out
  out=$("${cmd[@]}")
  python3 -c 'import json, sys
r = json.loads(sys.stdin.read()); r["label"], r["command"] = sys.argv[1], sys.argv[2]
print(json.dumps(r))' "$label" "${cmd[*]}" <<<"$out" >>"$RESULTS"
  echo "quality.sh: $label / $mode: $((SECONDS - t0)) s" >&2
}

for c in "${CONFIGS[@]}"; do
  label=${c%%|*}
  read -r -a flags <<<"${c#*|}"
  [[ $label =~ $ONLY ]] || continue
  run "$label" perplexity --prompt-len 1024 --eval-len 256 --windows "$WINDOWS" "${flags[@]}"
  run "$label" passkey --passkey --lengths 1200,2200 --samples "$SAMPLES" "${flags[@]}"
done

python3 "$ROOT/tools/quality_table.py" "$RESULTS" "$ROOT/docs/quality.md"
echo "quality.sh: table written to docs/quality.md ($RESULTS)" >&2
