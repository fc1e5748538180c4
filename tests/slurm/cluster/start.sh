#!/usr/bin/env bash
# start.sh DIR -- a real Slurm cluster (Debian's Slurm 22.05) on this one machine for baton's tests:
# as root, no systemd, every config/state/log file under DIR.
#
# One node (default): bound to 127.0.0.1. Two nodes (SLURM_NODES=2), with a real network link between them:
#   node1  slurmd in this machine's network namespace, address NET.1 on veth VETH0
#   node2  slurmd in network namespace NETNS, address NET.2 on veth VETH1 (the other end)
# each in a UTS namespace of its own (hostname node1 / node2) and a mount namespace of its own, where
# DIR/etc/hosts (node1 / node2 -> their addresses) is bind-mounted on /etc/hosts. Jobs inherit their node's
# namespaces, so torchrun's c10d rendezvous on node1 and gloo resolve the node names and go across the veth,
# as on a real cluster; the machine's own hostname and /etc/hosts stay as they are. slurmctld (listening on
# 0.0.0.0: node2 reaches it at NET.1) and munged run in this machine's namespaces.
#
# Installs the Debian packages if they are missing, writes DIR/etc/slurm.conf, starts munged + slurmctld +
# the slurmd(s), waits until every node is idle and writes DIR/env.sh. Every Slurm client needs
# SLURM_CONF=DIR/etc/slurm.conf (even `sinfo --help`). Stop it with stop.sh DIR: it cancels the jobs first
# (`scontrol shutdown` leaves them running) and removes the network namespace and the veth pair. Starting
# again in the same DIR stops what an earlier start left there first.
#
# Exit codes: 0 up; 3 Slurm is not installed and cannot be (not root, or apt-get failed), or two nodes are
# asked for without root (the caller should skip, not fail); 1 anything else (the reason is on stderr).
#
# Knobs (environment):
#   SLURM_NODES=1|2          one node (default) or two
#   SLURM_AUTH=munge|none    munge (default) or auth/none + cred/none (loopback test clusters only)
#   SLURMCTLD_PORT, SLURMD_PORT  default: the first free pair from 16917/16918 upwards (two nodes: from
#                            26917/26918), steps of 10, so a second cluster on the same machine does not collide
#   SLURM_CPUS=<n>           CPUs each node advertises (default 8: more than real, via config_overrides,
#                            so that several 2-process stages can be queued and run side by side)
#   SLURM_NODENAME=<name>    one node: default hostname -s (job node lists must resolve: c10d rendezvous uses them)
#   SLURM_NODENAMES="a b"    two nodes: default "node1 node2"
#   SLURM_NETNS, SLURM_VETH, SLURM_NET   two nodes: namespace, veth prefix (VETH0/VETH1) and /24 prefix
#                            (10.237.K); default: the first free K from 0 to 99, claimed atomically (`ip netns add`
#                            fails for a name that exists) as netns baton-slurm-K, veth bslurmK-0/bslurmK-1
#   SLURM_FIRST_JOB_ID=1     the first job id (another number keeps job ids, and what is derived from
#                            them, apart from a second test cluster on the same machine)
#   SLURM_START_TIMEOUT=60   seconds to wait for the nodes to be idle
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
DIR=$(realpath -m "$1")
NNODES=${SLURM_NODES:-1}
AUTH=${SLURM_AUTH:-munge}
CPUS=${SLURM_CPUS:-8}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
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
case $NNODES in
  1) NODES=${SLURM_NODENAME:-$(hostname -s)} ;;
  2) NODES=${SLURM_NODENAMES:-node1 node2}
     [ "$(wc -w <<<"$NODES")" = 2 ] || die "SLURM_NODENAMES must name two nodes" ;;
  *) die "SLURM_NODES must be 1 or 2" ;;
esac

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
if [ "$NNODES" = 2 ]; then
  [ "$(id -u)" = 0 ] || { log "two nodes need root (network namespace, veth pair, bind mounts)"; exit 3; }
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
fi
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
leftover=""
[ -f "$DIR/run/net.env" ] && leftover="its network"
for f in "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd*.pid "$DIR/munge/run/munged.pid"; do
  if alive "$(pidf "$f")"; then leftover="daemons"; fi
done
if [ -n "$leftover" ]; then log "an earlier cluster in $DIR left $leftover: stopping it"; "$HERE/stop.sh" "$DIR"; fi

# --------------------------------------------------------------- 3. layout
rm -rf "$DIR/state" "$DIR/log"   # fresh state: job ids start at 1
mkdir -p "$DIR"/{etc,state/ctld,log,run} "$DIR"/munge/{etc,run,lib,log}
chmod 755 "$DIR/munge" "$DIR/munge/run" "$DIR/munge/log"
chmod 700 "$DIR/munge/etc" "$DIR/munge/lib"

# --------------------------------------------------------------- 4. network (two nodes) and ports
SLOT=0
if [ "$NNODES" = 2 ]; then
  slots=$(seq 0 99)
  if [ -n "${SLURM_NETNS:-}${SLURM_VETH:-}${SLURM_NET:-}" ]; then slots=0; fi
  NETNS=""
  for k in $slots; do
    ns=${SLURM_NETNS:-baton-slurm-$k}; veth=${SLURM_VETH:-bslurm$k-}; net=${SLURM_NET:-10.237.$k}
    ip link show "${veth}0" >/dev/null 2>&1 && continue
    addrs=$(ip -4 -o addr show)
    grep -qF " $net." <<<"$addrs" && continue            # a subnet this machine already uses
    ip netns add "$ns" 2>/dev/null || continue           # atomic: two starts never claim the same namespace
    NETNS=$ns; VETH=$veth; NET=$net; SLOT=$k; break
  done
  [ -n "$NETNS" ] || die "no free network namespace / veth / subnet (SLURM_NETNS, SLURM_VETH, SLURM_NET)"
  # what stop.sh removes; written before anything else exists, so a failure from here on cleans up
  printf 'NETNS=%s\nVETH=%s\nNET=%s\n' "$NETNS" "$VETH" "$NET" >"$DIR/run/net.env"
  STARTED=1
  ip link add "${VETH}0" type veth peer name "${VETH}1" netns "$NETNS" || die "could not create veth ${VETH}0/${VETH}1"
  ip addr add "$NET.1/24" dev "${VETH}0"
  ip link set "${VETH}0" up
  ip -n "$NETNS" link set lo up   # torch's stores and gloo also talk to 127.0.0.1
  ip -n "$NETNS" addr add "$NET.2/24" dev "${VETH}1"
  ip -n "$NETNS" link set "${VETH}1" up
  veth_up() {
    ip -o link show "${VETH}0" | grep -q LOWER_UP && ip -n "$NETNS" -o link show "${VETH}1" | grep -q LOWER_UP
  }
  for _ in $(seq 1 50); do veth_up && break; sleep 0.1; done   # carrier is up within ms
  veth_up || die "veth ${VETH}0/${VETH}1 did not come up"
fi

# ports: given, or the first free pair
if [ -n "${SLURMCTLD_PORT:-}" ] || [ -n "${SLURMD_PORT:-}" ]; then
  CTLD_PORT=${SLURMCTLD_PORT:-16917}; D_PORT=${SLURMD_PORT:-16918}
  for port in $CTLD_PORT $D_PORT; do port_busy "$port" && die "port $port is already in use"; done
else
  # two nodes: from the claimed slot's own pair on, so that two-node clusters starting together do not race
  CTLD_PORT=""; first=$(( NNODES == 1 ? 16917 : 26917 + 10 * SLOT ))
  for base in $(seq "$first" 10 $((first + 990))); do
    if ! port_busy "$base" && ! port_busy $((base + 1)); then CTLD_PORT=$base; D_PORT=$((base + 1)); break; fi
  done
  [ -n "$CTLD_PORT" ] || die "no free port pair between $first and $((first + 991))"
fi

# --------------------------------------------------------------- 5. config
HW=$(slurmd -C | head -1)   # e.g. "NodeName=x CPUs=2 Boards=1 ... RealMemory=24105"
REALMEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
REALMEM=$(( REALMEM * 9 / 10 / NNODES ))   # headroom, or a node may go INVALID on memory; nodes share the machine
if [ "$AUTH" = munge ]; then
  AUTHINFO="socket=$DIR/munge/run/munge.socket,cred_expire=10"
else
  AUTHINFO="cred_expire=10"
fi
if [ "$NNODES" = 1 ]; then
  HOST="localhost(127.0.0.1)"
  COMM="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  SLURMD_FILES="SlurmdSpoolDir=$DIR/state/d
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
  mkdir -p "$DIR/state/d"
  NODELINES="NodeName=$NODES NodeAddr=127.0.0.1 NodeHostname=$NODES CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN"
else
  # "localhost" passes slurmctld's am-I-the-controller check (this machine's name is no node's); the address
  # is what the slurmds and clients connect to
  HOST="localhost($NET.1)"
  # NoCtldInAddrAny/NoInAddrAny would bind what this machine's name resolves to (127.0.0.1): node2 could not
  # reach slurmctld, nor the ports srun listens on for its steps
  COMM="# no CommunicationParameters: slurmctld and srun listen on 0.0.0.0"
  # %n, the node name: each slurmd its own spool folder, pid file and log (one port: they are in different netns)
  SLURMD_FILES="SlurmdSpoolDir=$DIR/state/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
  read -r N1 N2 <<<"$NODES"
  mkdir -p "$DIR/state/$N1" "$DIR/state/$N2"
  NODELINES="NodeName=$N1 NodeAddr=$NET.1 NodeHostname=$N1 CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN
NodeName=$N2 NodeAddr=$NET.2 NodeHostname=$N2 CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN"
  printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$NET.1" "$N1" "$NET.2" "$N2" >"$DIR/etc/hosts"   # inside the nodes
fi

cat >"$CONF" <<CONFEOF
# written by baton's tests/slurm/cluster/start.sh -- $NNODES node(s) on one machine
ClusterName=baton-test
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
$COMM
SlurmUser=root
SlurmdUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=$AUTHINFO
StateSaveLocation=$DIR/state/ctld
$SLURMD_FILES
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
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
$NODELINES
PartitionName=debug Nodes=${NODES// /,} Default=YES MaxTime=INFINITE State=UP
CONFEOF
echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"

# --------------------------------------------------------------- 6. daemons
rm -f "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd*.pid "$DIR/munge/run/munged.pid" "$DIR"/run/*.ns
STARTED=1
if [ "$AUTH" = munge ]; then
  [ -s "$DIR/munge/etc/munge.key" ] || mungekey --create --keyfile="$DIR/munge/etc/munge.key"
  chmod 600 "$DIR/munge/etc/munge.key"
  # --force: munged refuses a socket with any 0700 ancestor otherwise (mktemp -d, pytest's tmp_path).
  # One munged serves both nodes: its socket is a path, reachable from any network namespace.
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
if [ "$NNODES" = 1 ]; then
  slurmd -f "$CONF" -N "$NODES" || die "slurmd failed, see $DIR/log/slurmd.log"
else
  # a node: slurmd in new UTS and mount namespaces (private propagation: the /etc/hosts bind stays inside),
  # which live as long as it or a job step it forked does. Node2 joins its network namespace with nsenter,
  # not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup ("slurmd initialization failed").
  start_node() {  # name [command that runs the rest in the node's network namespace]
    local name=$1; shift
    "$@" unshare --uts --mount --propagation private -- /bin/sh -ec \
      'hostname "$1"; mount --bind "$2" /etc/hosts; exec slurmd -f "$3" -N "$1"' \
      sh "$name" "$DIR/etc/hosts" "$CONF" || die "slurmd $name failed, see $DIR/log/slurmd-$name.log"
  }
  start_node "$N1"
  start_node "$N2" nsenter "--net=/run/netns/$NETNS"
fi

# --------------------------------------------------------------- 7. wait until idle
want=$(for n in $NODES; do echo "$n=idle"; done | sort | tr '\n' ' ')
deadline=$(( $(date +%s) + TIMEOUT )); states=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  states=$(timeout 10 sinfo -h -N -n "${NODES// /,}" -o '%N=%T' 2>/dev/null | sort | tr '\n' ' ' || true)
  [ "$states" = "$want" ] && break
  # fail fast when a daemon died ("Address already in use")
  for f in "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd*.pid; do
    p=$(pidf "$f"); name=${f##*/}; name=${name%.pid}
    if [ -n "$p" ] && ! alive "$p"; then tail -n 5 "$DIR/log/$name.log" >&2 || true; die "$name exited"; fi
  done
  sleep 0.2
done
if [ "$states" != "$want" ]; then
  log "node states '$states' after ${TIMEOUT}s"; sinfo -R >&2 || true
  tail -n 20 "$DIR"/log/slurm*.log >&2 || true
  die "the nodes did not become idle"
fi
daemons=""
for n in $NODES; do
  p=$(pidf "$DIR/run/slurmd-$n.pid")
  [ -n "$p" ] || { daemons="$daemons slurmd $(pidf "$DIR/run/slurmd.pid") (port $D_PORT)"; continue; }
  # the node's own (uts, mnt) namespaces: stop.sh kills every process left in them
  echo "$(readlink "/proc/$p/ns/uts") $(readlink "/proc/$p/ns/mnt")" >"$DIR/run/$n.ns"
  daemons="$daemons slurmd-$n $p"
done
log "up in $(since "$T_START") s: slurmctld $(pidf "$DIR/run/slurmctld.pid") (port $CTLD_PORT),$daemons," \
    "nodes ${NODES// /,} CPUs=$CPUS${NETNS:+ (${N2:-} in netns $NETNS: $NET.2, veth ${VETH:-}0/${VETH:-}1)}, auth/$AUTH"
echo "export SLURM_CONF=$CONF"
