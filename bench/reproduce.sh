#!/usr/bin/env bash
# Wall time of `make reproduce` cold (fresh caches) and warm (nothing changed) -> reports/bench/reproduce.json
set -euo pipefail
cd "$(dirname "$0")/.."
PARAMS=${PARAMS:-params/toy.yaml}
name=$(basename "$PARAMS" .yaml)
rm -rf "reports/$name" "work/$name"
# a generated benchmark is part of the cold run (never a user's dataset)
synthetic_root=$(.venv/bin/python -c "from fmalib.core.params import load_params as L; p = L('$PARAMS'); \
print(p.resolve_path('data.root') if p['data']['kind'] == 'synthetic' else '')")
[ -z "$synthetic_root" ] || rm -rf "$synthetic_root"
load0=$(cut -d' ' -f1 /proc/loadavg)  # the 2 cores are shared: a busy machine explains a slow run
t0=$(date +%s.%N); make -s reproduce PARAMS="$PARAMS"; t1=$(date +%s.%N)
load1=$(cut -d' ' -f1 /proc/loadavg)
make -s reproduce PARAMS="$PARAMS"; t2=$(date +%s.%N)
cold=$(python3 -c "print($t1 - $t0)"); warm=$(python3 -c "print($t2 - $t1)")
mkdir -p reports/bench
printf '{"params": "%s", "cold_s": %.1f, "warm_s": %.1f, "cores": %d, "loadavg_1min_before": %s, "loadavg_1min_after_cold": %s}\n' \
  "$PARAMS" "$cold" "$warm" "$(nproc)" "$load0" "$load1" \
  | tee reports/bench/reproduce.json
