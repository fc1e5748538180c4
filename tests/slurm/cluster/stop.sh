#!/usr/bin/env bash
# stop.sh DIR -- stop the cluster that start.sh DIR started (one node or two); by pid only, never by name.
# 1) cancel every job (again, while any is left) and wait until squeue is empty (a bare `scontrol shutdown` leaves
#    slurmstepd and the jobs' processes running), 2) scontrol shutdown, 3) TERM, then KILL,
#    the daemons from their pid files (checked against their command line: pid reuse),
# 4) stray slurmstepd found by their sockets under DIR's spool folders, and (two nodes) every process still
#    in a node's namespaces: node2's network namespace, each node's recorded (uts, mnt) pair; with the last
#    of them goes the node's mount namespace and its /etc/hosts bind, 5) munged, 6) (two nodes) the veth
#    pair and the network namespace named in DIR/run/net.env, and then that file, so that stopping again
#    never touches a namespace another cluster has claimed since.
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
nsid() { echo "$(readlink "/proc/$1/ns/uts" 2>/dev/null) $(readlink "/proc/$1/ns/mnt" 2>/dev/null)"; }
wait_gone() {  # timeout_s pid...
  local t=$1; shift; local end=$(( $(date +%s) + t )) p any
  while :; do
    any=0; for p in "$@"; do alive "$p" && any=1; done
    [ $any = 0 ] && return 0
    [ "$(date +%s)" -ge "$end" ] && return 1
    sleep 0.1
  done
}

NETNS=""; VETH=""
if [ -f "$DIR/run/net.env" ]; then
  NETNS=$(sed -n 's/^NETNS=//p' "$DIR/run/net.env"); VETH=$(sed -n 's/^VETH=//p' "$DIR/run/net.env")
fi
CTLD=$(ourpid "$DIR/run/slurmctld.pid")
SLURMDS=$(for f in "$DIR"/run/slurmd*.pid; do ourpid "$f"; done | tr '\n' ' ')
SLURMDS=${SLURMDS% }
MUNGED=$(ourpid "$DIR/munge/run/munged.pid")
# the nodes' own (uts, mnt) namespaces (two nodes): as recorded at start, and from the live slurmds; never ours
# (one node: slurmd shares this machine's namespaces, and so would everything else)
MINE=$(nsid $$)
NODE_NS=$( { cat "$DIR"/run/*.ns 2>/dev/null; for p in $SLURMDS; do nsid "$p"; done; } \
           | grep -vxF "$MINE" | grep '^uts:.* mnt:' | sort -u)

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
  # shellcheck disable=SC2086
  wait_gone 15 $CTLD $SLURMDS
fi
pids=$(for p in $CTLD $SLURMDS; do alive "$p" && echo "$p"; done | tr '\n' ' ')
if [ -n "${pids// /}" ]; then
  # shellcheck disable=SC2086
  log "TERM $pids"; kill -TERM $pids 2>/dev/null
  # shellcheck disable=SC2086
  wait_gone 10 $pids || { log "KILL $pids"; kill -KILL $pids 2>/dev/null; wait_gone 5 $pids; }
fi

# stray step daemons (slurmd died while jobs ran): their listening sockets are under our spool folders
if [ -d "$DIR/state" ] && command -v ss >/dev/null 2>&1; then
  steps=$(ss -xlpn 2>/dev/null | grep -F "$DIR/state/" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
  if [ -n "$steps" ]; then
    tasks=""
    for s in $steps; do   # their children, from /proc (procps may be missing)
      tasks="$tasks $(grep -l "^PPid:[[:space:]]*$s\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3 | tr '\n' ' ')"
    done
    log "killing stray slurmstepd $steps and their tasks $tasks"
    # shellcheck disable=SC2086
    kill -KILL $tasks $steps 2>/dev/null
    # shellcheck disable=SC2086
    wait_gone 5 $tasks $steps
  fi
fi
# (two nodes) whatever is still inside a node: slurmstepd, job tasks and their children
strays=""
if [ -n "$NETNS" ] && [ -e "/run/netns/$NETNS" ]; then strays=$(ip netns pids "$NETNS" 2>/dev/null | tr '\n' ' '); fi
if [ -n "$NODE_NS" ]; then
  for d in /proc/[0-9]*; do
    grep -qxF "$(nsid "${d#/proc/}")" <<<"$NODE_NS" && strays="$strays ${d#/proc/}"
  done
fi
strays=$(for p in $strays; do [ "$p" != $$ ] && alive "$p" && echo "$p"; done | sort -un | tr '\n' ' ')
if [ -n "${strays// /}" ]; then
  log "killing what is left in the nodes' namespaces: $strays"
  # shellcheck disable=SC2086
  kill -KILL $strays 2>/dev/null
  # shellcheck disable=SC2086
  wait_gone 5 $strays
fi

if [ -n "$MUNGED" ]; then
  kill -TERM "$MUNGED" 2>/dev/null
  wait_gone 20 "$MUNGED" || { log "KILL $MUNGED"; kill -KILL "$MUNGED" 2>/dev/null; wait_gone 5 "$MUNGED"; }
fi

# (two nodes) the network: deleting one end of a veth pair deletes both
net=""
if [ -n "$VETH" ] && ip link show "${VETH}0" >/dev/null 2>&1; then
  ip link del "${VETH}0" && net="$net veth ${VETH}0/${VETH}1"
fi
if [ -n "$NETNS" ] && [ -e "/run/netns/$NETNS" ]; then ip netns del "$NETNS" && net="$net netns $NETNS"; fi
if [ -f "$DIR/run/net.env" ]; then
  if { [ -z "$VETH" ] || ! ip link show "${VETH}0" >/dev/null 2>&1; } \
     && { [ -z "$NETNS" ] || [ ! -e "/run/netns/$NETNS" ]; }; then
    rm -f "$DIR/run/net.env"
  else
    log "could not remove${VETH:+ veth ${VETH}0}${NETNS:+ netns $NETNS}"
  fi
fi
rm -f "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd*.pid "$DIR/munge/run/munged.pid" "$DIR"/run/*.ns
log "stopped${CTLD:+ slurmctld $CTLD}${SLURMDS:+ slurmd $SLURMDS}${MUNGED:+ munged $MUNGED}${net:+; removed$net}"
exit 0
