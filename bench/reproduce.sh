#!/usr/bin/env bash
# Wall time of `make reproduce` cold (fresh caches) and warm (nothing changed) -> reports/bench/reproduce.json
set -euo pipefail
cd "$(dirname "$0")/.."
PARAMS=${PARAMS:-params/toy.yaml}
name=$(basename "$PARAMS" .yaml)
rm -rf "reports/$name" "work/$name"
t0=$(date +%s.%N); make -s reproduce PARAMS="$PARAMS"; t1=$(date +%s.%N)
make -s reproduce PARAMS="$PARAMS"; t2=$(date +%s.%N)
cold=$(python3 -c "print($t1 - $t0)"); warm=$(python3 -c "print($t2 - $t1)")
mkdir -p reports/bench
printf '{"params": "%s", "cold_s": %.1f, "warm_s": %.1f, "cores": %d}\n' "$PARAMS" "$cold" "$warm" "$(nproc)" \
  | tee reports/bench/reproduce.json
