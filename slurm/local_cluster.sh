#!/usr/bin/env bash
# A real Slurm cluster on one machine, for tests and for trying the pipeline locally.
#
#   slurm/local_cluster.sh up     [--nodes N] [--dir DIR]   start (installs packages first when root)
#   slurm/local_cluster.sh down   [--dir DIR]               stop what `up` started (by PID files)
#   slurm/local_cluster.sh status [--dir DIR]               daemons + sinfo; exit 1 when not up
#
# Daemons: munged, MariaDB + slurmdbd (accounting: submitit/sacct need it to see cancelled or
# timed-out jobs), slurmctld, and one slurmd per emulated node (node1..nodeN, all on 127.0.0.1).
# Everything (config, keys, pids, spool, state, logs, database) lives in the state dir,
# default ${VPT_SLURM_DIR:-/tmp/vpt-slurm}. Clients find the cluster with:
#   source "$DIR/env.sh"       # exports SLURM_CONF
#
# Knobs (environment): VPT_SLURM_CPUS (CPUs advertised per node, 4), VPT_SLURM_MEM_MB (memory
# per node, 4096), VPT_SLURM_PORT_BASE (first port tried, 16800), VPT_SLURM_TIMEOUT_S (wait per step, 90).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

ACTION=${1:-}
[[ -n $ACTION ]] || usage
shift
NODES=""
DIR=${VPT_SLURM_DIR:-/tmp/vpt-slurm}
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    --dir) DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#*=}; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)

CPUS=${VPT_SLURM_CPUS:-4}
MEM_MB=${VPT_SLURM_MEM_MB:-4096}
PORT_BASE=${VPT_SLURM_PORT_BASE:-16800}
WAIT_S=${VPT_SLURM_TIMEOUT_S:-90}
CLUSTER=vpt
HOST=$(hostname -s)
ME=$(id -un)

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log MUNGE_DIR=$DIR/munge DB_DIR=$DIR/mariadb
SLURM_CONF_FILE=$ETC/slurm.conf
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DB_SOCKET=$DB_DIR/mariadb.sock
export SLURM_CONF=$SLURM_CONF_FILE

log() { echo "local_cluster: $*" >&2; }
die() { echo "local_cluster: ERROR: $*" >&2; exit 1; }

# --- process bookkeeping: PID files only, never process names -----------------------------

# pid_alive PIDFILE EXE: the PID in PIDFILE is running and is EXE (guards against PID reuse).
pid_alive() {
  local pidfile=$1 exe=$2 pid
  [[ -s $pidfile ]] || return 1
  pid=$(tr -dc '0-9' < "$pidfile")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$exe"
}

# stop_pidfiles "PIDFILE EXE"...: TERM them all, wait, then KILL what is left; tolerates
# missing or stale files. Stopping together keeps `down` short (each daemon takes ~2 s).
stop_pidfiles() {
  local pair pidfile exe pid i alive=()
  for pair in "$@"; do
    read -r pidfile exe <<< "$pair"
    if pid_alive "$pidfile" "$exe"; then
      pid=$(tr -dc '0-9' < "$pidfile")
      kill -TERM "$pid" 2>/dev/null || true
      alive+=("$pid:$exe")
    fi
    rm -f "$pidfile"
  done
  for pair in "${alive[@]}"; do
    pid=${pair%%:*} exe=${pair#*:}
    for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$exe (pid $pid) ignored TERM, killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $exe (pid $pid)"
  done
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds.
wait_for() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${limit}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- install ----------------------------------------------------------------------------------

have_binaries() {
  local b
  for b in munged slurmctld slurmd slurmdbd sbatch sinfo sacct; do
    command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin command -v "$b" >/dev/null || return 1
  done
  command -v mariadbd >/dev/null || PATH=$PATH:/usr/sbin command -v mariadbd >/dev/null || return 1
  command -v mariadb-install-db >/dev/null || return 1
}

install_packages() {
  have_binaries && return 0
  [[ $(id -u) -eq 0 ]] || die "Slurm/munge/MariaDB are not installed and installing them needs root"
  log "installing slurm, munge, slurmdbd and mariadb (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd \
    mariadb-server-core mariadb-client-core >/dev/null
  have_binaries || die "packages installed but binaries are still missing"
}

# --- configuration ----------------------------------------------------------------------------

# Ports are chosen once per state dir (free when chosen) and reused on every later `up`.
choose_ports() {
  local ports_file=$DIR/ports.env need=$((3 + NODES)) start candidate i ok
  if [[ -s $ports_file ]]; then
    # shellcheck disable=SC1090
    source "$ports_file"
    if [[ ${PORT_NODES:-0} -eq $NODES ]]; then
      # Reuse them unless the cluster is down and another program has taken one meanwhile.
      if pid_alive "$RUN/slurmctld.pid" slurmctld || pid_alive "$DB_DIR/mariadbd.pid" mariadbd; then return 0; fi
      ok=1
      for ((candidate = PORT_DB; candidate <= PORT_SLURMD_LAST; candidate++)); do
        if port_in_use "$candidate"; then ok=0; break; fi
      done
      if ((ok)); then return 0; fi
      log "port $candidate from $ports_file is taken by another program; choosing new ports"
    fi
  fi
  for ((start = PORT_BASE; start < PORT_BASE + 2000; start += need)); do
    ok=1
    for ((i = 0; i < need; i++)); do
      candidate=$((start + i))
      if port_in_use "$candidate"; then ok=0; break; fi
    done
    if ((ok)); then
      cat > "$ports_file" <<EOF
PORT_NODES=$NODES
PORT_DB=$start
PORT_DBD=$((start + 1))
PORT_CTLD=$((start + 2))
PORT_SLURMD_FIRST=$((start + 3))
PORT_SLURMD_LAST=$((start + 2 + NODES))
EOF
      # shellcheck disable=SC1090
      source "$ports_file"
      return 0
    fi
  done
  die "no block of $need free ports from $PORT_BASE"
}

write_configs() {
  local slurm_user=$ME
  mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool"
  cat > "$SLURM_CONF_FILE" <<EOF
# Generated by slurm/local_cluster.sh: $NODES emulated nodes on $HOST, state under $DIR.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmUser=$slurm_user
SlurmdUser=$slurm_user
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may only restart after it expires.
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups/systemd here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# Advertise $CPUS CPUs per node whatever the real core count is.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1,default_queue_depth=1000
# An afterok on a failed job cancels the dependent job instead of leaving it pending forever.
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
JobRequeue=1
MaxArraySize=1001
MaxJobCount=20000
MinJobAge=30
KillWait=2
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$PORT_DBD
# With munge, this names the munge socket used to authenticate to slurmdbd.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$PORT_SLURMD_FIRST-$PORT_SLURMD_LAST] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# For timeout tests: small limits are accepted, large ones rejected at submission (EnforcePartLimits).
PartitionName=short Nodes=ALL Default=NO MaxTime=00:05:00 DefaultTime=00:01:00 State=UP
EOF
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=$slurm_user
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
  cat > "$DIR/env.sh" <<EOF
# source this file to talk to the local Slurm cluster in $DIR
export SLURM_CONF=$SLURM_CONF_FILE
case ":\$PATH:" in *:/usr/sbin:*) ;; *) export PATH=\$PATH:/usr/sbin ;; esac
EOF
}

# --- daemons ----------------------------------------------------------------------------------

start_munge() {
  pid_alive "$MUNGE_DIR/munged.pid" munged && return 0
  local as=()
  [[ $(id -u) -eq 0 ]] && id munge >/dev/null 2>&1 && as=(runuser -u munge --)
  mkdir -p "$MUNGE_DIR"
  [[ ${#as[@]} -gt 0 ]] && chown munge: "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    "${as[@]}" mungekey --create --keyfile="$MUNGE_DIR/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  "${as[@]}" munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" --num-threads=4 9>&-
  wait_for 10 munged bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'" \
    || die "munged did not start; see $MUNGE_DIR/munged.log"
  log "munged up (pid $(cat "$MUNGE_DIR/munged.pid"))"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "$1"; }

start_mariadb() {
  pid_alive "$DB_DIR/mariadbd.pid" mariadbd && return 0
  local fresh=0 mariadbd_bin
  mariadbd_bin=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  mkdir -p "$DB_DIR"
  if [[ ! -d $DB_DIR/data/mysql ]]; then
    fresh=1
    log "initialising MariaDB in $DB_DIR/data (first time only)"
    mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user="$ME" \
      --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve \
      > "$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
  fi
  rm -f "$DB_SOCKET"
  # MariaDB does not daemonize itself: detach it from this shell's session.
  setsid "$mariadbd_bin" --no-defaults --datadir="$DB_DIR/data" --user="$ME" \
    --bind-address=127.0.0.1 --port="$PORT_DB" --socket="$DB_SOCKET" --pid-file="$DB_DIR/mariadbd.pid" \
    --log-error="$LOG/mariadb.log" --skip-name-resolve --skip-log-bin --innodb-use-native-aio=0 \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --max-connections=200 \
    < /dev/null > /dev/null 2>&1 9>&- &
  wait_for "$WAIT_S" MariaDB db_sql "SELECT 1" || die "MariaDB did not start; see $LOG/mariadb.log"
  if ((fresh)); then
    db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  fi
  log "MariaDB up on 127.0.0.1:$PORT_DB (pid $(cat "$DB_DIR/mariadbd.pid"))"
}

start_slurmdbd() {
  pid_alive "$RUN/slurmdbd.pid" slurmdbd && return 0
  slurmdbd 9>&-
  wait_for "$WAIT_S" slurmdbd port_in_use "$PORT_DBD" || die "slurmdbd did not start; see $LOG/slurmdbd.log"
  # slurmctld registers the cluster with slurmdbd by itself on first contact.
  log "slurmdbd up on 127.0.0.1:$PORT_DBD (pid $(cat "$RUN/slurmdbd.pid"))"
}

start_slurmctld() {
  pid_alive "$RUN/slurmctld.pid" slurmctld && return 0
  slurmctld 9>&-
  wait_for "$WAIT_S" slurmctld scontrol ping || die "slurmctld did not start; see $LOG/slurmctld.log"
  log "slurmctld up on 127.0.0.1:$PORT_CTLD (pid $(cat "$RUN/slurmctld.pid"))"
}

start_slurmds() {
  local n
  for ((n = 1; n <= NODES; n++)); do
    pid_alive "$RUN/slurmd-node$n.pid" slurmd && continue
    mkdir -p "$DIR/spool/slurmd-node$n"
    slurmd -N "node$n" 9>&-
  done
}

# All NODES nodes respond and can take work (idle, or busy with jobs kept from before).
nodes_ready() {
  local ready
  ready=$(sinfo -h -N -p main -o '%N %T' | awk '$2 ~ /^(idle|mixed|allocated)$/' | sort -u | wc -l)
  [[ $ready -eq $NODES ]]
}

daemons_up() {
  local n
  pid_alive "$MUNGE_DIR/munged.pid" munged && pid_alive "$DB_DIR/mariadbd.pid" mariadbd \
    && pid_alive "$RUN/slurmdbd.pid" slurmdbd && pid_alive "$RUN/slurmctld.pid" slurmctld || return 1
  for ((n = 1; n <= NODES; n++)); do pid_alive "$RUN/slurmd-node$n.pid" slurmd || return 1; done
}

configured_nodes() { [[ -s $DIR/ports.env ]] && sed -n 's/^PORT_NODES=//p' "$DIR/ports.env"; }

cmd_up() {
  local running
  running=$(configured_nodes || true)
  if [[ -z $NODES ]]; then NODES=${running:-3}; fi
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
  if [[ -n $running && $running -ne $NODES ]] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
    die "cluster in $DIR runs $running nodes; run 'down' first to change to $NODES"
  fi
  install_packages
  PATH=$PATH:/usr/sbin
  choose_ports
  if daemons_up && nodes_ready; then
    log "already up: $NODES nodes in $DIR (source $DIR/env.sh)"
    return 0
  fi
  local t0=$SECONDS
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmds
  wait_for "$WAIT_S" "$NODES idle nodes" nodes_ready || die "nodes not ready; see $LOG/slurmd-node*.log"
  log "up: $NODES nodes in $DIR in $((SECONDS - t0))s (source $DIR/env.sh)"
}

cmd_down() {
  local f n
  PATH=$PATH:/usr/sbin
  if [[ -f $SLURM_CONF_FILE ]] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
    # Cancel this cluster's jobs so no job processes outlive their slurmd.
    if [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
      squeue -h -o %A | xargs -r scancel 2>/dev/null || true
      wait_for 10 "jobs to end" bash -c '[[ -z $(squeue -h -o %A) ]]' || true
    fi
  fi
  local slurm_daemons=("$RUN/slurmctld.pid slurmctld")
  for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && slurm_daemons+=("$f slurmd"); done
  stop_pidfiles "${slurm_daemons[@]}"
  # slurmdbd after slurmctld (which flushes accounting on exit), MariaDB after slurmdbd.
  stop_pidfiles "$RUN/slurmdbd.pid slurmdbd"
  stop_pidfiles "$DB_DIR/mariadbd.pid mariadbd" "$MUNGE_DIR/munged.pid munged"
  log "down ($DIR)"
}

cmd_status() {
  local up=0 n
  PATH=$PATH:/usr/sbin
  NODES=$(configured_nodes || true)
  [[ -n $NODES ]] || { echo "no cluster configured in $DIR"; return 1; }
  for pair in "$MUNGE_DIR/munged.pid munged" "$DB_DIR/mariadbd.pid mariadbd" \
              "$RUN/slurmdbd.pid slurmdbd" "$RUN/slurmctld.pid slurmctld"; do
    set -- $pair
    if pid_alive "$1" "$2"; then echo "$2: running (pid $(cat "$1"))"; else echo "$2: stopped"; up=1; fi
  done
  for ((n = 1; n <= NODES; n++)); do
    if pid_alive "$RUN/slurmd-node$n.pid" slurmd; then
      echo "slurmd node$n: running (pid $(cat "$RUN/slurmd-node$n.pid"))"
    else echo "slurmd node$n: stopped"; up=1; fi
  done
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then sinfo; fi
  echo "SLURM_CONF=$SLURM_CONF_FILE"
  return $up
}

# One up/down at a time per state dir (parallel test sessions may share one cluster).
# Daemons are started with `9>&-` so that they do not inherit (and hold) this lock.
lock_state_dir() { exec 9> "$DIR/.lock"; flock 9; }

case $ACTION in
  up) lock_state_dir; cmd_up ;;
  down) lock_state_dir; cmd_down ;;
  status) cmd_status ;;
  *) usage ;;
esac
