#!/usr/bin/env bash
# Side-by-side fan-out benchmark of presenced against the alternatives, through the product
# owners' harness in ../shared/peers (it installs its own Node packages and Redis).
#
#   bench/run_peers.sh                 # presenced (3 regions) and presenced-1region, S1 + S2
#   bench/run_peers.sh S1 S2 S5 wan    # choose scenarios; "wan" = 40 ms one-way on every
#                                      # inter-region link (custom scenario, 30 x 20 Hz)
#   WITH_ALTERNATIVES=1 bench/run_peers.sh S1   # also socket.io + Redis on the same run
# Results: JSON lines in bench/results/ (git-ignored); figures go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS="${PEERS:-$(readlink -f ../shared/peers)}"
SYSTEM="$PWD/bench/peers-system.js"
mkdir -p bench/results
export OUT="${OUT:-$PWD/bench/results/peers-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
export REPEATS="${REPEATS:-3}"
scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(S1 S2)
for sc in "${scenarios[@]}"; do
  if [ "$sc" = wan ]; then
    PRESENCED_REGIONS=3 "$PEERS/run.sh" "$SYSTEM" custom --clients 30 --rate 20 --duration 15 --wan-delay 40
    continue
  fi
  PRESENCED_REGIONS=3 "$PEERS/run.sh" "$SYSTEM" "$sc"
  if [ "$sc" = S1 ] || [ "$sc" = S2 ]; then PRESENCED_REGIONS=1 "$PEERS/run.sh" "$SYSTEM" "$sc"; fi
  if [ "${WITH_ALTERNATIVES:-0}" = 1 ]; then "$PEERS/run.sh" socketio-redis "$sc"; fi
done
echo "results: $OUT" >&2
