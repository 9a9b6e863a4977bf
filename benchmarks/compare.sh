#!/usr/bin/env bash
# benchmarks/compare.sh [--scenario relay|accept|conns] [options of the bench harness]
#
# exmta (candidate B) against Postfix (peer A, the bench default) with the
# shared harness's compare.sh, which alternates A B A B ... in one invocation
# (--rounds, default 3) and prints ratio_msgs_per_s=B/A last.
#
# Without --scenario it runs three comparisons in turn and prints their ratio
# lines at the end:  relay 4 KiB (-m 10000), accept 4 KiB (-m 10000) and
# accept 100 KiB (-l 102400 -m 3000); further options apply to all three
# (later options win, e.g. `compare.sh -m 2000 --rounds 1` for a quick look).
#
# Harness location: $EXMTA_BENCH_DIR, else ../shared/bench from the repo root.
# BENCH_SCRATCH: the peers' scratch dir (setup_peers.sh is run there, without
# Haraka, when it has no peers.env yet; default: a new temp dir).
# Candidate: CAND_NAME (exmta) CAND_PORT (10060) CAND_SINK_PORT (10061)
# CAND_CMD (benchmarks/exmta_bench_run.sh {port} {sink_port}); peer: PEER_*.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="${EXMTA_BENCH_DIR:-$REPO/../shared/bench}"
[ -x "$BENCH/compare.sh" ] || { echo "compare.sh: no bench harness in $BENCH (set EXMTA_BENCH_DIR)" >&2; exit 2; }
BENCH="$(cd "$BENCH" && pwd)"
if [ -z "${BENCH_SCRATCH:-}" ]; then
    BENCH_SCRATCH="$(mktemp -d -t exmta-bench.XXXXXX)"
fi
if [ ! -f "$BENCH_SCRATCH/peers.env" ]; then
    WITH_HARAKA=0 "$BENCH/setup_peers.sh" "$BENCH_SCRATCH" >&2
fi
export BENCH_SCRATCH
export CAND_NAME="${CAND_NAME:-exmta}"
export CAND_PORT="${CAND_PORT:-10060}"
export CAND_SINK_PORT="${CAND_SINK_PORT-10061}"
export CAND_CMD="${CAND_CMD:-$REPO/benchmarks/exmta_bench_run.sh {port\} {sink_port\}}"
echo "[exmta compare] bench=$BENCH scratch=$BENCH_SCRATCH candidate: $CAND_CMD" >&2

for arg in "$@"; do
    case "$arg" in --scenario|--scenario=*) exec "$BENCH/compare.sh" "$@" ;; esac
done

results=()
run() {
    local label="$1"; shift
    local out
    out="$(mktemp)"
    if "$BENCH/compare.sh" "$@" | tee "$out"; then
        results+=("$label $(tail -n 1 "$out")")
    else
        results+=("$label FAILED")
    fi
    rm -f "$out"
}
run relay_4k --scenario relay -m 10000 "$@"
run accept_4k --scenario accept -m 10000 "$@"
run accept_100k --scenario accept -l 102400 -m 3000 "$@"
printf '%s\n' "${results[@]}"
for r in "${results[@]}"; do case "$r" in *FAILED) exit 1 ;; esac; done
