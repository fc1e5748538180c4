#!/usr/bin/env bash
# start.sh DIR -- a real one-node Slurm cluster (Debian's Slurm 22.05) for baton's tests:
# as root, no systemd, bound to 127.0.0.1, every config/state/log file under DIR.
#
# Installs the Debian packages if they are missing, writes DIR/etc/slurm.conf, starts
# munged + slurmctld + slurmd, waits until the node is idle and writes DIR/env.sh.
# Every Slurm client needs SLURM_CONF=DIR/etc/slurm.conf (even `sinfo --help`).
# Stop it with stop.sh DIR (cancels jobs first: `scontrol shutdown` leaves them running).
#
# Exit codes: 0 up; 3 Slurm is not installed and cannot be (not root, or apt-get failed:
# the caller should skip, not fail); 1 anything else (the reason is on stderr).
#
# Knobs (environment):
#   SLURM_AUTH=munge|none    munge (default) or auth/none + cred/none (loopback test clusters only)
#   SLURMCTLD_PORT, SLURMD_PORT  default: the first free pair from 16917/16918 upwards (steps of 10),
#                            so a second cluster on the same machine does not collide
#   SLURM_CPUS=<n>           CPUs the node advertises (default 8: more than real, via config_overrides,
#                            so that several 2-process stages can be queued and run side by side)
#   SLURM_NODENAME=<name>    default: hostname -s (job node lists must resolve: c10d rendezvous uses them)
#   SLURM_FIRST_JOB_ID=1     the first job id (another number keeps job ids, and what is derived from
#                            them, apart from a second test cluster on the same machine)
#   SLURM_START_TIMEOUT=60   seconds to wait for the node to be idle
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
DIR=$(realpath -m "$1")
AUTH=${SLURM_AUTH:-munge}
CPUS=${SLURM_CPUS:-8}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODE=${SLURM_NODENAME:-$(hostname -s)}
CONF=$DIR/etc/slurm.conf
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T_START=$(date +%s.%N)

log() { echo "[slurm-start] $*" >&2; }
STARTED=0
die() {
  log "ERROR: $*"
  if [ "$STARTED" = 1 ]; then "$HERE/stop.sh" "$DIR" || true; fi   # never leave half a cluster behind
  exit 1
}
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
case $AUTH in munge|none) ;; *) die "SLURM_AUTH must be munge or none" ;; esac

# pid alive and not a zombie (PID 1 in containers may reap orphans only lazily)
alive() {
  local st
  [ -n "${1:-}" ] || return 1
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1   # no ps: procps may be missing
  [[ $st != Z* ]]
}
pidf() { cat "$1" 2>/dev/null || true; }
port_busy() {  # something listens on 127.0.0.1:$1 / *:$1
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "( sport = :$1 )" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

mkdir -p "$DIR"

# ---------------------------------------------------------------- 1. install
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch    >/dev/null 2>&1 || need+=(slurm-client)
if [ "$AUTH" = munge ]; then command -v munged >/dev/null 2>&1 || need+=(munge); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then log "Slurm is not installed (${need[*]}) and installing needs root"; exit 3; fi
  command -v apt-get >/dev/null 2>&1 || { log "Slurm is not installed and there is no apt-get"; exit 3; }
  log "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -o DPkg::Lock::Timeout=120 --no-install-recommends "${need[@]}" >"$DIR/apt-install.log" 2>&1; then
    # a clean machine may have no package lists yet
    apt-get update >"$DIR/apt-update.log" 2>&1 || true
    if ! apt-get install -y -o DPkg::Lock::Timeout=120 --no-install-recommends "${need[@]}" >"$DIR/apt-install.log" 2>&1; then
      tail -n 20 "$DIR/apt-update.log" "$DIR/apt-install.log" >&2 || true
      log "apt-get install ${need[*]} failed (log: $DIR/apt-install.log)"
      exit 3
    fi
  fi
  log "installed in $(since "$T_START") s"
fi

# ------------------------------------------- 2. leftovers of an earlier cluster in DIR
export SLURM_CONF=$CONF
for f in "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" "$DIR/munge/run/munged.pid"; do
  if alive "$(pidf "$f")"; then log "daemons of an earlier cluster in $DIR are running: stopping them"; "$HERE/stop.sh" "$DIR"; break; fi
done

# --------------------------------------------------------------- 3. layout
rm -rf "$DIR/state" "$DIR/log"   # fresh state: job ids start at 1
mkdir -p "$DIR"/{etc,state/ctld,state/d,log,run} "$DIR"/munge/{etc,run,lib,log}
chmod 755 "$DIR/munge" "$DIR/munge/run" "$DIR/munge/log"
chmod 700 "$DIR/munge/etc" "$DIR/munge/lib"

# ports: given, or the first free pair
if [ -n "${SLURMCTLD_PORT:-}" ] || [ -n "${SLURMD_PORT:-}" ]; then
  CTLD_PORT=${SLURMCTLD_PORT:-16917}; D_PORT=${SLURMD_PORT:-16918}
  for port in $CTLD_PORT $D_PORT; do port_busy "$port" && die "port $port is already in use"; done
else
  CTLD_PORT=""
  for base in $(seq 16917 10 17907); do
    if ! port_busy "$base" && ! port_busy $((base + 1)); then CTLD_PORT=$base; D_PORT=$((base + 1)); break; fi
  done
  [ -n "$CTLD_PORT" ] || die "no free port pair between 16917 and 17908"
fi

# --------------------------------------------------------------- 4. config
HW=$(slurmd -C | head -1)   # e.g. "NodeName=x CPUs=2 Boards=1 ... RealMemory=24105"
REALMEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
REALMEM=$(( REALMEM * 9 / 10 ))   # headroom, or the node may go INVALID on memory
if [ "$AUTH" = munge ]; then
  AUTHINFO="socket=$DIR/munge/run/munge.socket,cred_expire=10"
else
  AUTHINFO="cred_expire=10"
fi

cat >"$CONF" <<CONFEOF
# written by baton's tests/slurm/cluster/start.sh -- one node, loopback only
ClusterName=baton-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=$AUTHINFO
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=0
# without it a job depending on a failed one pends forever (under SchedulerParameters it is ignored)
DependencyParameters=kill_invalid_depend
MpiDefault=none
ReturnToService=2
# advertise SLURM_CPUS even when the machine has fewer
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# no sacct here: finished jobs stay in scontrol show job for MinJobAge s, and get a line in jobcomp.txt
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=300
FirstJobId=${SLURM_FIRST_JOB_ID:-1}
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONFEOF
echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"

# --------------------------------------------------------------- 5. daemons
rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" "$DIR/munge/run/munged.pid"
STARTED=1
if [ "$AUTH" = munge ]; then
  [ -s "$DIR/munge/etc/munge.key" ] || mungekey --create --keyfile="$DIR/munge/etc/munge.key"
  chmod 600 "$DIR/munge/etc/munge.key"
  # --force: munged refuses a socket with any 0700 ancestor otherwise (mktemp -d, pytest's tmp_path)
  munged --force --key-file="$DIR/munge/etc/munge.key" --socket="$DIR/munge/run/munge.socket" \
         --pid-file="$DIR/munge/run/munged.pid" --log-file="$DIR/munge/log/munged.log" \
         --seed-file="$DIR/munge/lib/munged.seed" || die "munged failed, see $DIR/munge/log/munged.log"
  for _ in $(seq 1 50); do
    munge -n -S "$DIR/munge/run/munge.socket" 2>/dev/null | unmunge -S "$DIR/munge/run/munge.socket" >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n -S "$DIR/munge/run/munge.socket" | unmunge -S "$DIR/munge/run/munge.socket" >/dev/null \
    || die "munged is not answering, see $DIR/munge/log/munged.log"
fi

# both daemonize and write their pid files; slurmctld exits 0 even when it then cannot bind
# its port, hence the port check above and the liveness check below
slurmctld -f "$CONF" || die "slurmctld failed, see $DIR/log/slurmctld.log"
slurmd -f "$CONF" -N "$NODE" || die "slurmd failed, see $DIR/log/slurmd.log"

# --------------------------------------------------------------- 6. wait until idle
deadline=$(( $(date +%s) + TIMEOUT )); state=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  for f in slurmctld slurmd; do   # fail fast when a daemon died (e.g. "Address already in use")
    p=$(pidf "$DIR/run/$f.pid")
    if [ -n "$p" ] && ! alive "$p"; then tail -n 5 "$DIR/log/$f.log" >&2 || true; die "$f exited"; fi
  done
  sleep 0.2
done
if [ "$state" != idle ]; then
  log "node state '$state' after ${TIMEOUT}s"; sinfo -R >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  die "the node did not become idle"
fi
log "up in $(since "$T_START") s: slurmctld $(pidf "$DIR/run/slurmctld.pid") (port $CTLD_PORT), slurmd $(pidf "$DIR/run/slurmd.pid") (port $D_PORT), node $NODE CPUs=$CPUS, auth/$AUTH"
echo "export SLURM_CONF=$CONF"
