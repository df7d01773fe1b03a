#!/usr/bin/env bash
# Run one command with the machine to itself: timings on a shared 2-core machine mean something only then.
#   benchmarks/quiet.sh python benchmarks/classic.py ...
# It waits for the CPU lock (one benchmark at a time) and pauses the long low-priority jobs started with
# benchmarks/background.sh (SIGSTOP to their process groups) until the command ends.
set -uo pipefail
LOCK="${PRUNEKIT_CPU_LOCK:-/tmp/prunekit-cpu.lock}"
REG="${PRUNEKIT_BACKGROUND_DIR:-/tmp/prunekit-background}"
exec 9>"$LOCK"
flock 9
paused=()
for f in "$REG"/*.pgid; do
  [ -e "$f" ] || continue
  pgid="$(cat "$f")"
  if kill -0 -- "-$pgid" 2>/dev/null; then kill -STOP -- "-$pgid" && paused+=("$pgid"); else rm -f "$f"; fi
done
resume() { for pgid in "${paused[@]}"; do kill -CONT -- "-$pgid" 2>/dev/null; done; }
trap resume EXIT
"$@"
