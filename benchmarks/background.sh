#!/usr/bin/env bash
# Start a long job (a resumable safety run, model training) at the lowest priority, in its own process
# group, registered so that benchmarks/quiet.sh can pause it while a timed benchmark runs.
#   benchmarks/background.sh NAME LOGFILE command args...
set -euo pipefail
name="$1"; log="$2"; shift 2
REG="${PRUNEKIT_BACKGROUND_DIR:-/tmp/prunekit-background}"
mkdir -p "$REG"
setsid nice -n 19 "$@" >"$log" 2>&1 < /dev/null &
pid=$!
# setsid starts a new session, hence a new scheduler autogroup, in which `nice` alone only ranks the job against
# itself: lower the whole group too, or the job takes an equal share of the CPU from a timed benchmark
echo 19 > "/proc/$pid/autogroup" 2>/dev/null || true
echo "$pid" > "$REG/$name.pgid"
echo "started $name (pgid $pid), log $log"
