#!/usr/bin/env bash
# stop.sh DIR -- stop the cluster that start.sh DIR started; by pid only, never by name.
# 1) cancel every job (again, while any is left) and wait until squeue is empty (a bare `scontrol shutdown` leaves
#    slurmstepd and the jobs' processes running), 2) scontrol shutdown, 3) TERM, then KILL,
#    the daemons from their pid files (checked against their command line: pid reuse),
# 4) stray slurmstepd found by their sockets under DIR's spool folder, 5) munged.
# Idempotent: does nothing when nothing runs.
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
DIR=$(realpath -m "$1")
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
log() { echo "[slurm-stop] $*" >&2; }
alive() {
  local st
  [ -n "${1:-}" ] || return 1
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1   # no ps: procps may be missing
  [[ $st != Z* ]]   # a zombie is dead
}
ourpid() {  # the pid in file $1, if that process is alive and its command line names DIR
  local p; p=$(cat "$1" 2>/dev/null) || return 0
  if [ -n "$p" ] && alive "$p" && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF "$DIR"; then echo "$p"; fi
  return 0
}
wait_gone() {  # timeout_s pid...
  local t=$1; shift; local end=$(( $(date +%s) + t )) p any
  while :; do
    any=0; for p in "$@"; do alive "$p" && any=1; done
    [ $any = 0 ] && return 0
    [ "$(date +%s)" -ge "$end" ] && return 1
    sleep 0.1
  done
}

CTLD=$(ourpid "$DIR/run/slurmctld.pid")
SLURMD=$(ourpid "$DIR/run/slurmd.pid")
MUNGED=$(ourpid "$DIR/munge/run/munged.pid")

if [ -n "$CTLD" ]; then
  jobs=$(timeout 15 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 15 scancel $jobs 2>/dev/null || true
    for i in $(seq 1 100); do   # up to ~20 s, COMPLETING included
      left=$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
      [ -z "${left// /}" ] && break
      # a job that requeues itself when signalled comes back PENDING: cancel again
      # shellcheck disable=SC2086
      [ $((i % 10)) = 0 ] && timeout 15 scancel $left 2>/dev/null
      sleep 0.2
    done
  fi
  timeout 15 scontrol shutdown >/dev/null 2>&1 || log "scontrol shutdown failed"
  wait_gone 15 $CTLD $SLURMD
fi
pids=$(for p in $CTLD $SLURMD; do alive "$p" && echo "$p"; done)
if [ -n "$pids" ]; then
  log "TERM $pids"; kill -TERM $pids 2>/dev/null
  wait_gone 10 $pids || { log "KILL $pids"; kill -KILL $pids 2>/dev/null; wait_gone 5 $pids; }
fi

# stray step daemons (slurmd died while jobs ran): their listening sockets are under our spool folder
if [ -d "$DIR/state/d" ] && command -v ss >/dev/null 2>&1; then
  steps=$(ss -xlpn 2>/dev/null | grep -F "$DIR/state/d/" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
  if [ -n "$steps" ]; then
    tasks=""
    for s in $steps; do   # their children, from /proc (procps may be missing)
      tasks="$tasks $(grep -l "^PPid:[[:space:]]*$s\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3 | tr '\n' ' ')"
    done
    log "killing stray slurmstepd $steps and their tasks $tasks"
    # shellcheck disable=SC2086
    kill -KILL $tasks $steps 2>/dev/null
    wait_gone 5 $tasks $steps
  fi
fi

if [ -n "$MUNGED" ]; then
  kill -TERM "$MUNGED" 2>/dev/null
  wait_gone 20 "$MUNGED" || { log "KILL $MUNGED"; kill -KILL "$MUNGED" 2>/dev/null; wait_gone 5 "$MUNGED"; }
fi
rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" "$DIR/munge/run/munged.pid"
log "stopped${CTLD:+ slurmctld $CTLD}${SLURMD:+ slurmd $SLURMD}${MUNGED:+ munged $MUNGED}"
exit 0
