#!/usr/bin/env bash
# Start a real one-node SLURM on this machine (for CI): munged, slurmctld and slurmd, all as plain daemons
# (no systemd). Needs root. Installs Debian's slurm-wlm and munge with apt-get where they are missing,
# writes a one-node /etc/slurm/slurm.conf (backing up a config it did not write), starts what is not
# running yet and waits until the node is idle. Safe to run again: daemons running from its pid files are
# left alone. Stop everything it started with scripts/slurm-stop.sh.
#
# Environment: SLURM_LOCAL_TIMEOUT (seconds to wait for the node, default 60),
#              SLURM_LOCAL_PARTITION (name of the default partition, default "ci").
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C

# shared with scripts/slurm-stop.sh
RUN_DIR=/run/slurm-local              # pid files, and the marker saying munged was started by this script
STATE_DIR=/var/lib/slurm-local        # StateSaveLocation and SlurmdSpoolDir
LOG_DIR=/var/log/slurm-local          # daemon logs, job completion log, apt log
CONF=/etc/slurm/slurm.conf            # where Debian's slurm reads its config (built with --sysconfdir=/etc/slurm)
MARK="# written by iat scripts/slurm-local.sh"
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_MARK=$RUN_DIR/munged.started
MUNGE_PID=/run/munge/munged.pid       # munged's own (compiled-in) pid file
MUNGE_KEY=/etc/munge/munge.key
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
PARTITION=${SLURM_LOCAL_PARTITION:-ci}

started=""   # daemons this run started, named in a failure line (scripts/slurm-stop.sh stops them)
fail() {  # fail WHAT LOG: one clear line, non-zero exit
  echo "slurm-local: FAILED: $1${2:+ (read $2)}${started:+; this run started$started: scripts/slurm-stop.sh stops them}" >&2
  exit 1
}
note() { echo "slurm-local: $*"; }

# running NAME PIDFILE: the pid file names a live process called NAME
running() {
  local pid
  [ -s "$2" ] || return 1
  pid=$(head -n1 "$2" 2>/dev/null | tr -dc 0-9)
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# start_daemon NAME PIDFILE LOG CMD...: run CMD (which daemonizes itself) and wait until PIDFILE names a live NAME;
# the daemon writes its pid file a moment after CMD returns, so a missing pid file right away is no failure
start_daemon() {
  local name=$1 pidfile=$2 log=$3 i
  shift 3
  rm -f "$pidfile"
  "$@" >"$LOG_DIR/$name.stderr" 2>&1 9>&- || fail "starting $name ($*)" "$LOG_DIR/$name.stderr and $log"
  started+=" $name"
  for (( i = 0; i < 150; i++ )); do running "$name" "$pidfile" && return 0; sleep 0.1; done
  fail "$name started but no live $name in $pidfile after 15s" "$LOG_DIR/$name.stderr and $log"
}

[ "$(id -u)" = 0 ] || fail "must run as root (try: sudo bash $0)"
mkdir -p "$RUN_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
chmod 0755 "$RUN_DIR" "$STATE_DIR" "$LOG_DIR"
# one run at a time (two CI steps starting it together would race on the pid files); start_daemon closes
# fd 9 for the daemons, or they would hold the lock as long as they run
exec 9>"$RUN_DIR/lock"
flock -w 300 9 || fail "another slurm-local.sh holds $RUN_DIR/lock"

# --- 1. packages ---------------------------------------------------------------------------------------------
missing=0
for cmd in slurmctld slurmd sinfo squeue sbatch scontrol srun munged munge unmunge; do
  command -v "$cmd" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  command -v apt-get >/dev/null 2>&1 || fail "slurm/munge are missing and there is no apt-get to install them"
  note "installing slurm-wlm and munge with apt-get (log: $LOG_DIR/apt.log)"
  # keep package scripts from starting services (no init system to start them in a container)
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && added_policy=1
  fi
  rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold slurm-wlm munge
  } >"$LOG_DIR/apt.log" 2>&1 || rc=$?
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || fail "apt-get install slurm-wlm munge (exit $rc)" "$LOG_DIR/apt.log"
fi
getent passwd munge >/dev/null || fail "the munge user does not exist after installing munge" "$LOG_DIR/apt.log"
SLURM_VERSION=$(slurmd -V 2>/dev/null | awk '{print $2}')

# --- 2. munge ------------------------------------------------------------------------------------------------
if [ ! -e "$MUNGE_KEY" ]; then
  mkdir -p "$(dirname "$MUNGE_KEY")"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$MUNGE_KEY" || fail "mungekey --create --keyfile=$MUNGE_KEY"
  elif command -v create-munge-key >/dev/null 2>&1; then
    create-munge-key -f || fail "create-munge-key"
  else
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none || fail "dd a munge key to $MUNGE_KEY"
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"
  note "created munge key $MUNGE_KEY"
fi
for d in /run/munge /var/lib/munge /var/log/munge; do
  mkdir -p "$d"
  chown munge:munge "$d"
done
chmod 0755 /run/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
munge_state="already running"
if ! pgrep -x munged >/dev/null 2>&1; then
  # no munged at all: a socket or lock left in /run/munge is stale, --force lets munged replace it
  start_daemon munged "$MUNGE_PID" /var/log/munge/munged.log runuser -u munge -- munged --force
  cat "$MUNGE_PID" >"$MUNGE_MARK"   # tells slurm-stop.sh this munged is ours to stop
  munge_state="started by this script"
fi
for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
munge_ok || fail "munge -n | unmunge does not work" "/var/log/munge/munged.log"

# --- 3. slurm.conf -------------------------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
headroom=$(( mem_mb / 10 > 512 ? mem_mb / 10 : 512 ))   # 10%, at least 512 MB, for the OS and the daemons
REAL_MEM=$(( mem_mb - headroom > 256 ? mem_mb - headroom : 256 ))
DEF_MEM=$(( REAL_MEM / CPUS ))                           # so jobs without --mem still fit CPUS side by side

new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
$MARK (slurm $SLURM_VERSION): a one-node cluster for CI.
# It rewrites this file on every run; a config it did not write is first copied to slurm.conf.bak-iat-*.
ClusterName=iatlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups needed (containers in CI have no usable cgroup hierarchy)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
SchedulerType=sched/backfill
# CPUs and memory are consumable: several 1-CPU jobs run side by side
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM
# no slurmdbd here, so sacct does not work; finished jobs go to the job completion log instead
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
JobRequeue=1
# a requeued job waits cred_expire+1 s before it may start again (default 120 s; 10 s suits one local node),
# and is then started by the next full scheduling pass (sched_interval, default 60 s): together a requeued job
# runs again some 11-16 s after the requeue instead of 2-3 minutes
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
# trust the node line below rather than draining the node when the hardware probe disagrees
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if [ -e "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARK"; then
  backup="$CONF.bak-iat-$(date +%Y%m%d-%H%M%S)"
  cp -p "$CONF" "$backup" || fail "backing up the existing $CONF to $backup"
  note "$CONF was not written by this script: copied it to $backup"
fi
if ! cmp -s "$new_conf" "$CONF" 2>/dev/null; then
  mkdir -p "$(dirname "$CONF")"
  install -m 0644 "$new_conf" "$CONF"
  conf_changed=1
fi

# --- 4. daemons ----------------------------------------------------------------------------------------------
stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM and wait (used only to restart ours after a new slurm.conf)
  local pid i
  running "$1" "$2" || return 0
  pid=$(head -n1 "$2" | tr -dc 0-9)
  kill -TERM "$pid" 2>/dev/null || true
  for (( i = 0; i < 300; i++ )); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  fail "$1 (pid $pid) did not stop within 30s for a restart with the new $CONF" "$LOG_DIR/$1.log"
}
ctld_state="already running"
slurmd_state="already running"
if [ "$conf_changed" = 1 ] && { running slurmctld "$CTLD_PID" || running slurmd "$SLURMD_PID"; }; then
  # plugins and AuthInfo are read only at start (scontrol reconfigure does not apply them): restart ours;
  # running jobs survive this (slurmd re-attaches to their slurmstepd)
  note "$CONF changed: restarting slurmctld and slurmd"
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$CTLD_PID"
fi
if ! running slurmctld "$CTLD_PID"; then
  start_daemon slurmctld "$CTLD_PID" "$LOG_DIR/slurmctld.log" slurmctld
  ctld_state="started"
fi
deadline=$(( SECONDS + TIMEOUT ))
until scontrol ping 2>/dev/null | grep -q 'is UP'; do
  running slurmctld "$CTLD_PID" || fail "slurmctld exited after starting" "$LOG_DIR/slurmctld.log"
  [ "$SECONDS" -lt "$deadline" ] || fail "slurmctld did not answer scontrol ping within ${TIMEOUT}s" "$LOG_DIR/slurmctld.log"
  sleep 0.5
done

slurmd_since=0   # when this run started slurmd: the node counts only once that slurmd has registered
if ! running slurmd "$SLURMD_PID"; then
  slurmd_since=$(date +%s)
  start_daemon slurmd "$SLURMD_PID" "$LOG_DIR/slurmd.log" slurmd
  slurmd_state="started"
fi

# --- 5. wait for the node ------------------------------------------------------------------------------------
resumed=0
while :; do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1)
  case "$state" in
    idle|mix|mixed|alloc|allocated|comp|completing)              # usable (busy only when jobs already run)
      # the state may be the one slurmctld saved at its last stop: wait for the new slurmd's registration
      reg=$(scontrol show node "$HOST" 2>/dev/null | grep -oE 'SlurmdStartTime=[0-9T:-]+' | cut -d= -f2)
      reg_s=$(date -d "${reg:-1970-01-01}" +%s 2>/dev/null || echo 0)
      [ "$reg_s" -ge "$slurmd_since" ] && break ;;
    down|drain|drng|draining|fail)                              # responding but taken out of service: resume
      if [ "$resumed" -lt 3 ]; then
        reason=$(sinfo -h -n "$HOST" -o %E 2>/dev/null | head -n1)
        note "node $HOST is $state (${reason:-no reason}): resuming it"
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        resumed=$(( resumed + 1 ))
      fi ;;
  esac
  running slurmd "$SLURMD_PID" || fail "slurmd exited after starting" "$LOG_DIR/slurmd.log"
  running slurmctld "$CTLD_PID" || fail "slurmctld exited" "$LOG_DIR/slurmctld.log"
  [ "$SECONDS" -lt "$deadline" ] ||
    fail "node $HOST not idle within ${TIMEOUT}s (state: ${state:-none})" "$LOG_DIR/slurmd.log and $LOG_DIR/slurmctld.log"
  sleep 0.5
done

note "up: slurm $SLURM_VERSION, node $HOST ($CPUS CPUs, ${REAL_MEM} MB, $state) in partition $PARTITION;" \
  "slurmctld $ctld_state, slurmd $slurmd_state, munged $munge_state; conf $CONF; logs $LOG_DIR/;" \
  "pid files $CTLD_PID $SLURMD_PID; stop with scripts/slurm-stop.sh"
