#!/usr/bin/env bash
# benchmarks/cpu_per_msg.sh [-n MESSAGES] [-s SIZE] [-p PORT] [--profile FILE]
#
# CPU milliseconds per message of exmta, receive side and delivery side
# separately (benchmarks/PERFORMANCE.rst). Immune to a busy machine in the
# way wall-clock throughput is not: it reads the server's own CPU accounting.
#
# Starts smtp-sink (as nobody) on PORT+1 and exmta (benchmarks/exmta_bench_run.sh)
# on PORT relaying to it, warms up with 200 messages, then sends -n messages
# (default 3000) of -s octets (4096) with accept.py (20 clients, a new
# connection per message), waits until the queue is empty and prints utime
# and stime per message of the twistd process and of its receive workers:
#
#   EXMTA_RECEIVE_WORKERS=1 benchmarks/cpu_per_msg.sh    # receive = worker, delivery = main
#   benchmarks/cpu_per_msg.sh                            # one process does both
#
# Last line: main_cpu_ms_per_msg=.. workers_cpu_ms_per_msg=.. drain_s=.. left=..
# --profile FILE runs twistd under cProfile (exmta_bench_run.sh EXMTA_PROFILE).
# BENCH_SCRATCH defaults to /var/tmp/exmta-cpu (emptied spool at each start).
# Everything listens on 127.0.0.1; every process started here is stopped by PID.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N=3000; SIZE=4096; PORT=10160; PROFILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n) N="$2"; shift 2 ;;
        -s) SIZE="$2"; shift 2 ;;
        -p) PORT="$2"; shift 2 ;;
        --profile) PROFILE="$2"; shift 2 ;;
        *) echo "usage: $0 [-n N] [-s SIZE] [-p PORT] [--profile FILE]" >&2; exit 2 ;;
    esac
done
SINK=$((PORT + 1))
export BENCH_SCRATCH="${BENCH_SCRATCH:-/var/tmp/exmta-cpu}"
mkdir -p "$BENCH_SCRATCH"
QUEUE="$BENCH_SCRATCH/exmta/data/queue"
LOGS="$BENCH_SCRATCH/logs"; mkdir -p "$LOGS"

smtp-sink -u nobody -c "127.0.0.1:$SINK" 1000 > "$LOGS/sink.log" 2>&1 &
SINKPID=$!
if [ -n "$PROFILE" ]; then export EXMTA_PROFILE="$PROFILE"; fi
"$REPO/benchmarks/exmta_bench_run.sh" "$PORT" "$SINK" > "$LOGS/exmta.log" 2>&1 &
EPID=$!
cleanup() {
    kill "$EPID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.2; done
    kill "$SINKPID" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 150); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }       # utime stime (clock ticks)
workers() { pgrep -P "$EPID" || true; }
sum_workers() { local u=0 s=0; for p in $(workers); do read -r a b < <(ticks "$p"); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
queued() { find "$QUEUE/incoming" "$QUEUE/active" "$QUEUE/deferred" -name '*.json' 2>/dev/null | wc -l; }
drain() { for _ in $(seq 1 600); do [ "$(queued)" = 0 ] && return 0; sleep 0.5; done; return 1; }

python3 "$REPO/benchmarks/accept.py" "127.0.0.1:$PORT" -m 200 -M 200 --warmup 0 --sizes "$SIZE" > /dev/null 2>&1
drain || true
read -r MU0 MS0 < <(ticks "$EPID"); read -r WU0 WS0 < <(sum_workers)
python3 "$REPO/benchmarks/accept.py" "127.0.0.1:$PORT" -m "$N" -M "$N" -t 600 --warmup 0 --sizes "$SIZE" --pid "$EPID" 2>&1 | tail -2
T0=$(date +%s.%N); drain || true; T1=$(date +%s.%N)
read -r MU1 MS1 < <(ticks "$EPID"); read -r WU1 WS1 < <(sum_workers)
HZ=$(getconf CLK_TCK)
python3 - "$N" "$HZ" "$MU0" "$MS0" "$MU1" "$MS1" "$WU0" "$WS0" "$WU1" "$WS1" "$T0" "$T1" "$(queued)" <<'EOF'
import sys
n, hz = int(sys.argv[1]), int(sys.argv[2])
mu0, ms0, mu1, ms1, wu0, ws0, wu1, ws1 = map(int, sys.argv[3:11])
t0, t1, left = float(sys.argv[11]), float(sys.argv[12]), int(sys.argv[13])
ms = lambda ticks: round(ticks * 1000 / hz / n, 3)
print(f"main (twistd): user {ms(mu1 - mu0)} sys {ms(ms1 - ms0)} ms/msg;"
      f" workers: user {ms(wu1 - wu0)} sys {ms(ws1 - ws0)} ms/msg")
print(f"main_cpu_ms_per_msg={ms(mu1 - mu0 + ms1 - ms0)} workers_cpu_ms_per_msg={ms(wu1 - wu0 + ws1 - ws0)}"
      f" drain_s={t1 - t0:.1f} left={left}")
EOF
