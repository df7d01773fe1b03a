#!/usr/bin/env bash
# Start a long job (a resumable safety run, model training) at the lowest priority, in its own process
# group, registered so that benchmarks/quiet.sh can pause it while a timed benchmark runs.
#   benchmarks/background.sh NAME LOGFILE command args...
set -euo pipefail
name="$1"; log="$2"; shift 2
REG="${PRUNEKIT_BACKGROUND_DIR:-/tmp/prunekit-background}"
mkdir -p "$REG"
# setsid starts a new session, hence a new scheduler autogroup, in which `nice` alone only ranks the job against
# itself: the job lowers its own autogroup first, or it takes an equal share of the CPU from a timed benchmark.
# (Written from inside the new session: `$!` may be setsid's parent, whose autogroup is the caller's own.)
rm -f "$REG/$name.pgid"
setsid --fork bash -c 'echo $$ > "$1"; echo 19 > /proc/self/autogroup 2>/dev/null; shift; exec nice -n 19 "$@"' \
  _ "$REG/$name.pgid" "$@" >"$log" 2>&1 < /dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$REG/$name.pgid" ] && break; sleep 0.1; done
pid="$(cat "$REG/$name.pgid")"
echo "started $name (pgid $pid), log $log"
