#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft, broker+controller in one JVM) on 127.0.0.1,
# built from the Maven Central jars listed in scripts/kafka/pom.xml. For tests and local use.
#
#   scripts/kafka/broker.sh fetch                 # jars -> .kafka/jars (skipped when up to date)
#   scripts/kafka/broker.sh start [--dir D] [--new] [--port P] [--controller-port C]
#   scripts/kafka/broker.sh stop  [--dir D | --all]
#   scripts/kafka/broker.sh status [--dir D]
#   scripts/kafka/broker.sh clean [--keep N]      # delete stopped run dirs (not the newest N, not <10 min old)
#
# start prints `BOOTSTRAP=127.0.0.1:<port>` on stdout (everything else goes to stderr) and writes
# <dir>/broker.env (BOOTSTRAP, CONTROLLER, PID, DIR, LOG; sourceable by sh). Without --dir it reuses
# the running broker that .kafka/current points to, or (with --new, or when none runs) starts a
# fresh one in .kafka/run-<date>-<pid>. Starting an existing dir restarts it on the same ports and
# keeps its data. stop sends SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT seconds.
#
# Environment: KAFKA_HEAP (512m), KAFKA_START_TIMEOUT (90 s), KAFKA_STOP_TIMEOUT (30 s),
# KAFKA_JVM_OPTS (extra JVM flags), RWKV_STREAM_KAFKA_HOME (default <repo>/.kafka).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
KAFKA_HOME=${RWKV_STREAM_KAFKA_HOME:-$REPO_ROOT/.kafka}
mkdir -p "$KAFKA_HOME"
KAFKA_HOME=$(cd "$KAFKA_HOME" && pwd -P)
JARS_DIR=$KAFKA_HOME/jars
POM=$SCRIPT_DIR/pom.xml
LOG4J_CONF=$SCRIPT_DIR/log4j2.xml
HEAP=${KAFKA_HEAP:-512m}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}

log() { echo "kafka: $*" >&2; }
# Run a long command with a progress line on stderr every 10 s (elapsed time, local Maven repository size).
with_heartbeat() {
    "$@" &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if (( (SECONDS - start) % 10 < 2 && SECONDS - start >= 10 )); then
            echo "kafka: still fetching: $((SECONDS - start)) s, $(du -sm "$HOME/.m2/repository" 2>/dev/null \
                | cut -f1) MB in ~/.m2" >&3
        fi
    done
    wait "$pid"
}
die() { echo "kafka: error: $*" >&2; exit 1; }

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

need_java() {
    command -v java >/dev/null 2>&1 || die "java not found on PATH (Kafka 4.x needs Java 17+)"
    local v
    v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
    [[ -n "$v" && "$v" -ge 17 ]] || die "Kafka 4.x needs Java 17+, found: $(java -version 2>&1 | head -1)"
}

pom_stamp() { sha256sum < "$POM" | cut -d' ' -f1; }

cmd_fetch() {
    mkdir -p "$KAFKA_HOME"
    local stamp
    stamp=$(pom_stamp)
    (
        flock 9
        if [[ -f "$JARS_DIR/.pom.sha256" && "$(cat "$JARS_DIR/.pom.sha256")" == "$stamp" ]] \
            && compgen -G "$JARS_DIR/kafka_2.13-*.jar" >/dev/null; then
            log "jars up to date in $JARS_DIR"
            exit 0
        fi
        command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once to fetch the Kafka jars)"
        local tmp="$KAFKA_HOME/jars.tmp.$$"
        rm -rf "$tmp"
        log "fetching Kafka jars from Maven Central into $JARS_DIR ..."
        exec 3>&2  # progress lines go to the caller's stderr; mvn's own output goes to fetch.log
        if ! with_heartbeat mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
                -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_HOME/fetch.log" 2>&1; then
            rm -rf "$tmp"
            tail -n 40 "$KAFKA_HOME/fetch.log" >&2
            die "mvn dependency:copy-dependencies failed (full output: $KAFKA_HOME/fetch.log)"
        fi
        exec 3>&-
        compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die "no kafka_2.13 jar after fetch"; }
        echo "$stamp" > "$tmp/.pom.sha256"
        rm -rf "$JARS_DIR"
        mv "$tmp" "$JARS_DIR"
        log "fetched $(ls "$JARS_DIR"/*.jar | wc -l) jars ($(basename "$(ls "$JARS_DIR"/kafka_2.13-*.jar)"))"
    ) 9>"$KAFKA_HOME/.fetch.lock"
}

free_port() {
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' \
                && return 0
        fi
    done
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 30000))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "could not find a free port"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

abspath() { mkdir -p "$1" && (cd "$1" && pwd -P); }

# pid of the broker of run dir $1 if it is running, else nothing (and status 1)
broker_pid() {
    local d=$1 pid
    [[ -f "$d/broker.pid" ]] || return 1
    pid=$(cat "$d/broker.pid" 2>/dev/null) || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # guard against a recycled pid: the JVM carries its run dir on the command line
    tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "-Drwkv.kafka.dir=$d" || return 1
    echo "$pid"
}

prop() { sed -n "s/^$1=//p" "$2" | tail -1; }

bootstrap_of() { prop listeners "$1/server.properties" | tr ',' '\n' | sed -n 's#^PLAINTEXT://##p'; }
controller_of() { prop listeners "$1/server.properties" | tr ',' '\n' | sed -n 's#^CONTROLLER://##p'; }

log_tail() {
    local d=$1 f
    for f in "$d/logs/format.log" "$d/logs/stdout.log"; do
        [[ -s "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 20 "$f" >&2
    done
    f="$d/logs/server.log"
    if [[ -s "$f" ]]; then
        echo "----- last errors in $f -----" >&2
        grep -E "^\[[^]]*\] (ERROR|FATAL) " "$f" | tail -n 10 >&2 || true
        echo "----- tail of $f -----" >&2
        tail -n 30 "$f" >&2
    fi
}

resolve_default_dir() {
    [[ -L "$KAFKA_HOME/current" || -d "$KAFKA_HOME/current" ]] || return 1
    (cd "$KAFKA_HOME/current" 2>/dev/null && pwd -P)
}

write_properties() {
    local d=$1 port=$2 ctl=$3
    cat > "$d/server.properties" <<EOF
# Single-node KRaft test broker written by scripts/kafka/broker.sh. Not for production.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$ctl
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/data

# One broker: every internal topic has one replica and min ISR 1; few partitions so they are quick to create.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=4

# Faster tests: no join delay; session timeouts down to 1 s allowed (client default stays 10 s/45 s).
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.min.heartbeat.interval.ms=500
# After a crash (SIGKILL) the restarted node waits out the old incarnation's broker session (default 9 s).
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
# Aborted/expired transactions are cleaned up sooner than the 10 s default.
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
transaction.remove.expired.transaction.cleanup.interval.ms=60000

# Retention and cleaning: sane for a short-lived local broker.
log.retention.hours=24
log.retention.check.interval.ms=60000
log.segment.bytes=67108864
log.cleaner.enable=true
log.cleaner.backoff.ms=2000
log.cleaner.dedupe.buffer.size=16777216
message.max.bytes=1048588

num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
}

cmd_start() {
    local dir="" port="" ctl="" new=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dir) dir=${2:?--dir needs a value}; shift 2 ;;
            --dir=*) dir=${1#--dir=}; shift ;;
            --port) port=${2:?--port needs a value}; shift 2 ;;
            --controller-port) ctl=${2:?--controller-port needs a value}; shift 2 ;;
            --new) new=1; shift ;;
            *) die "start: unknown argument '$1'" ;;
        esac
    done
    need_java
    cmd_fetch

    if [[ -z "$dir" ]]; then
        local cur pid
        if [[ $new -eq 0 ]] && cur=$(resolve_default_dir) && pid=$(broker_pid "$cur"); then
            log "already running (pid $pid) in $cur"
            echo "BOOTSTRAP=$(bootstrap_of "$cur")"
            return 0
        fi
        dir="$KAFKA_HOME/run-$(date +%Y%m%d-%H%M%S)-$$"
    fi
    dir=$(abspath "$dir")
    mkdir -p "$dir/logs" "$dir/data"

    local pid
    if pid=$(broker_pid "$dir"); then
        log "already running (pid $pid) in $dir"
        echo "BOOTSTRAP=$(bootstrap_of "$dir")"
        return 0
    fi

    if [[ -f "$dir/server.properties" ]]; then
        # restart on the same data dir and the same ports
        port=$(bootstrap_of "$dir"); port=${port##*:}
        ctl=$(controller_of "$dir"); ctl=${ctl##*:}
        [[ -n "$port" && -n "$ctl" ]] || die "cannot read the ports from $dir/server.properties"
    else
        [[ -n "$port" ]] || port=$(free_port)
        [[ -n "$ctl" ]] || ctl=$(free_port)
        while [[ "$ctl" == "$port" ]]; do ctl=$(free_port); done
        write_properties "$dir" "$port" "$ctl"
    fi
    local p
    for p in "$port" "$ctl"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another broker on $dir?)"
    done

    local cp="$JARS_DIR/*"
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        local cluster_id
        cluster_id=$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>>"$dir/logs/format.log" | tail -1) \
            || { log_tail "$dir"; die "StorageTool random-uuid failed"; }
        # (no log4j config here: its few log lines go to format.log, not into the broker's server.log)
        if ! java -Xmx256m -Dlog4j2.level=WARN -cp "$cp" \
                kafka.tools.StorageTool format --standalone --ignore-formatted -t "$cluster_id" \
                -c "$dir/server.properties" >>"$dir/logs/format.log" 2>&1; then
            log_tail "$dir"
            die "StorageTool format failed for $dir"
        fi
    fi

    local offset=0
    [[ -f "$dir/logs/server.log" ]] && offset=$(stat -c %s "$dir/logs/server.log")
    rm -f "$dir/broker.env"
    # setsid: own session, so signals to the caller's process group (Ctrl-C in pytest) don't hit it;
    # all three std streams go to files so a caller capturing our output does not wait on the JVM.
    # shellcheck disable=SC2086
    setsid java -Xmx"$HEAP" -Xms128m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$dir/logs" \
        -Drwkv.kafka.dir="$dir" ${KAFKA_JVM_OPTS:-} -cp "$cp" kafka.Kafka "$dir/server.properties" \
        </dev/null >>"$dir/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" > "$dir/broker.pid"

    local t0=$SECONDS
    while true; do
        if [[ -f "$dir/logs/server.log" ]] \
            && tail -c +"$((offset + 1))" "$dir/logs/server.log" | grep -q "Kafka Server started"; then
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$dir"
            die "broker exited during startup (dir $dir)"
        fi
        if (( SECONDS - t0 >= START_TIMEOUT )); then
            kill -KILL "$pid" 2>/dev/null || true
            log_tail "$dir"
            die "broker not ready after ${START_TIMEOUT}s (dir $dir); killed it"
        fi
        sleep 0.2
    done

    cat > "$dir/broker.env.tmp" <<EOF
BOOTSTRAP=127.0.0.1:$port
CONTROLLER=127.0.0.1:$ctl
PID=$pid
DIR=$dir
LOG=$dir/logs/server.log
EOF
    mv "$dir/broker.env.tmp" "$dir/broker.env"
    if [[ "$dir" == "$KAFKA_HOME"/* ]]; then ln -sfn "$dir" "$KAFKA_HOME/current"; fi
    log "started pid $pid in $((SECONDS - t0))s, dir $dir"
    echo "BOOTSTRAP=127.0.0.1:$port"
}

stop_dir() {
    local dir=$1 pid
    if ! pid=$(broker_pid "$dir"); then
        log "not running: $dir"
        rm -f "$dir/broker.pid" "$dir/broker.env"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local t0=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS - t0 >= STOP_TIMEOUT )); then
            log "no exit ${STOP_TIMEOUT}s after SIGTERM, sending SIGKILL to $pid"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$dir/broker.pid" "$dir/broker.env"
    log "stopped pid $pid in $((SECONDS - t0))s ($dir)"
}

cmd_stop() {
    local dir="" all=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dir) dir=${2:?--dir needs a value}; shift 2 ;;
            --dir=*) dir=${1#--dir=}; shift ;;
            --all) all=1; shift ;;
            *) die "stop: unknown argument '$1'" ;;
        esac
    done
    if [[ $all -eq 1 ]]; then
        local d
        for d in "$KAFKA_HOME"/run-* ; do
            [[ -d "$d" ]] && stop_dir "$d"
        done
        return 0
    fi
    if [[ -z "$dir" ]]; then
        dir=$(resolve_default_dir) || { log "no broker started yet ($KAFKA_HOME/current missing)"; return 0; }
    fi
    [[ -d "$dir" ]] || die "no such run dir: $dir"
    stop_dir "$(cd "$dir" && pwd -P)"
}

cmd_status() {
    local dir=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dir) dir=${2:?--dir needs a value}; shift 2 ;;
            --dir=*) dir=${1#--dir=}; shift ;;
            *) die "status: unknown argument '$1'" ;;
        esac
    done
    local dirs=() d pid rc=1
    if [[ -n "$dir" ]]; then
        [[ -d "$dir" ]] || die "no such run dir: $dir"
        dirs=("$(cd "$dir" && pwd -P)")
    else
        for d in "$KAFKA_HOME"/run-*; do [[ -d "$d" ]] && dirs+=("$d"); done
    fi
    for d in "${dirs[@]}"; do
        if pid=$(broker_pid "$d"); then
            echo "running pid=$pid bootstrap=$(bootstrap_of "$d") dir=$d"
            rc=0
        else
            echo "stopped dir=$d"
        fi
    done
    [[ ${#dirs[@]} -gt 0 ]] || echo "no brokers under $KAFKA_HOME"
    return $rc
}

cmd_clean() {
    # Delete run dirs whose broker is not running, newest --keep N kept; dirs touched in the last
    # 10 minutes are kept too (a broker may be formatting there right now).
    local keep=0 d n=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --keep) keep=${2:?--keep needs a value}; shift 2 ;;
            *) die "clean: unknown argument '$1'" ;;
        esac
    done
    # newest first
    while IFS= read -r d; do
        [[ -d "$d" ]] || continue
        broker_pid "$d" >/dev/null && continue
        n=$((n + 1))
        (( n <= keep )) && continue
        [[ -n "$(find "$d" -maxdepth 0 -mmin -10)" ]] && continue
        rm -rf "$d"
        log "removed $d"
    done < <(ls -1dt "$KAFKA_HOME"/run-* 2>/dev/null)
    [[ -e "$KAFKA_HOME/current" ]] || rm -f "$KAFKA_HOME/current"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        fetch) cmd_fetch "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        clean) cmd_clean "$@" ;;
        -h|--help|help) usage ;;
        *) usage; exit 2 ;;
    esac
}

main "$@"
