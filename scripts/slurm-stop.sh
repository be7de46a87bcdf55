#!/usr/bin/env bash
# Stop what scripts/slurm-local.sh started: slurmd and slurmctld (by their pid files), and munged only if that
# script started it. Waits for each to exit; a no-op when nothing runs. Needs root.
# Jobs still running keep their slurmstepd (slurmd re-attaches to them on the next start): scancel them first
# if a clean machine is wanted.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C

# shared with scripts/slurm-local.sh
RUN_DIR=/run/slurm-local
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_MARK=$RUN_DIR/munged.started
MUNGE_PID=/run/munge/munged.pid
WAIT=${SLURM_STOP_TIMEOUT:-30}

[ "$(id -u)" = 0 ] || { echo "slurm-stop: FAILED: must run as root" >&2; exit 1; }
[ -d "$RUN_DIR" ] || { echo "slurm-stop: nothing to stop ($RUN_DIR does not exist)"; exit 0; }
exec 9>"$RUN_DIR/lock"
flock -w 300 9 || { echo "slurm-stop: FAILED: another slurm script holds $RUN_DIR/lock" >&2; exit 1; }

pid_of() {  # pid_of NAME PIDFILE: the pid if the file names a live process called NAME
  local pid
  [ -s "$2" ] || return 1
  pid=$(head -n1 "$2" 2>/dev/null | tr -dc 0-9)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

stopped=()
failed=0
stop() {  # stop NAME PIDFILE: SIGTERM, wait up to $WAIT s, then SIGKILL
  local pid i
  pid=$(pid_of "$1" "$2") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for (( i = 0; i < WAIT * 10; i++ )); do
    [ -d "/proc/$pid" ] || break
    sleep 0.1
  done
  if [ -d "/proc/$pid" ]; then
    echo "slurm-stop: $1 (pid $pid) ignored SIGTERM for ${WAIT}s: sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for (( i = 0; i < 50; i++ )); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then echo "slurm-stop: FAILED: $1 (pid $pid) is still running" >&2; failed=1; return 0; fi
  fi
  stopped+=("$1 (pid $pid)")
}

stop slurmd "$SLURMD_PID"
stop slurmctld "$CTLD_PID"
rm -f "$SLURMD_PID" "$CTLD_PID"
if [ -s "$MUNGE_MARK" ]; then
  # only the munged this script's partner started (its pid is in the marker)
  if [ "$(pid_of munged "$MUNGE_PID" || true)" = "$(tr -dc 0-9 <"$MUNGE_MARK")" ]; then
    stop munged "$MUNGE_PID"
  fi
  [ "$failed" = 1 ] || rm -f "$MUNGE_MARK"
fi

if [ "${#stopped[@]}" = 0 ]; then
  echo "slurm-stop: nothing was running"
else
  echo "slurm-stop: stopped ${stopped[*]}"
fi
if steps=$(pgrep -x slurmstepd 2>/dev/null); then
  echo "slurm-stop: note: job steps still run (slurmstepd pids: $(echo $steps)); scancel jobs before stopping to end them" >&2
fi
exit "$failed"
