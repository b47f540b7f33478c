#!/usr/bin/env bash
# shellcheck shell=bash
# Real servers for the test suite: PostgreSQL on 127.0.0.1:5432 (trust auth for local
# connections, database `test`, user postgres) and Redis on 127.0.0.1:6379.
#
# A server that already answers is left alone. One that does not is installed with apt-get
# when missing and started (no systemd needed), and remembered in VB_STARTED_PG /
# VB_STARTED_REDIS so that vb_services_stop stops exactly those and nothing else.
#
# Sourced:  . scripts/services.sh; trap vb_services_stop EXIT; vb_ensure_postgres; vb_ensure_redis
# Run:      scripts/services.sh check    report what answers, change nothing
#           scripts/services.sh start    ensure both are up and leave them running

# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VB_PG_HOST=127.0.0.1
VB_PG_PORT=5432
VB_PG_DB="test"
VB_REDIS_HOST=127.0.0.1
VB_REDIS_PORT=6379
VB_STARTED_PG=""    # "<version> <cluster>" of a PostgreSQL cluster this script started
VB_STARTED_REDIS="" # non-empty when this script started Redis
# The lines put first in pg_hba.conf of a cluster this script starts (first match wins).
VB_PG_HBA_MARK="# voicebot scripts/services.sh: trust local connections (tests)"

# True when something accepts TCP connections on host:port (bash's /dev/tcp, no client needed).
vb_port_open() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the child bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# Wait up to ~30 s for a check command to succeed.
vb_wait_for() {
    local i
    for ((i = 0; i < 60; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}

# ---------------------------------------------------------------- PostgreSQL

vb_pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$VB_PG_HOST" -p "$VB_PG_PORT" -t 3
    else
        vb_port_open "$VB_PG_HOST" "$VB_PG_PORT"
    fi
}

vb_psql() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$VB_PG_HOST" -p "$VB_PG_PORT" -U postgres "$@"
}

# Make sure database `test` exists; needs trust auth (or a password in PGPASSWORD/~/.pgpass).
vb_pg_ensure_db() {
    if ! command -v psql >/dev/null 2>&1; then
        vb_warn "no psql here: cannot check that database '$VB_PG_DB' exists"
        return 0
    fi
    if vb_psql -d "$VB_PG_DB" -tAc 'SELECT 1' >/dev/null 2>&1; then
        return 0
    fi
    if vb_psql -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
        vb_log "PostgreSQL: creating database '$VB_PG_DB'"
        vb_psql -d postgres -c "CREATE DATABASE $VB_PG_DB" >/dev/null
        return 0
    fi
    vb_warn "PostgreSQL on $VB_PG_HOST:$VB_PG_PORT does not let user postgres in without a" \
        "password; the PostgreSQL tests need trust auth for 127.0.0.1 and a database '$VB_PG_DB'"
}

# The newest cluster named `main` ("<version> <port> <status>"), or nothing.
vb_pg_main_cluster() {
    { pg_lsclusters --no-header 2>/dev/null || true; } |
        awk '$2 == "main" { print $1, $3, $4 }' | sort -V | tail -n 1
}

# Put trust lines for local connections first in the cluster's pg_hba.conf (once).
vb_pg_trust_local() {
    local hba="/etc/postgresql/$1/main/pg_hba.conf" tmp
    vb_as_root grep -qF "$VB_PG_HBA_MARK" "$hba" && return 0
    vb_log "PostgreSQL: trust auth for local connections in $hba"
    tmp="$(mktemp)"
    {
        echo "$VB_PG_HBA_MARK"
        echo "local   all   all                  trust"
        echo "host    all   all   127.0.0.1/32   trust"
        echo "host    all   all   ::1/128        trust"
        echo
        vb_as_root cat "$hba"
    } >"$tmp"
    vb_as_root tee "$hba" <"$tmp" >/dev/null # tee keeps the file's owner and mode
    rm -f "$tmp"
}

vb_ensure_postgres() {
    if vb_pg_ready; then
        vb_log "PostgreSQL already answers on $VB_PG_HOST:$VB_PG_PORT: leaving it alone"
        vb_pg_ensure_db
        return 0
    fi

    local cluster="" version port status was_online=0
    if command -v pg_lsclusters >/dev/null 2>&1; then
        cluster="$(vb_pg_main_cluster)"
    fi
    [[ "$cluster" == *" online" ]] && was_online=1
    if ! command -v pg_ctlcluster >/dev/null 2>&1 ||
        ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
        vb_apt_install postgresql
    fi
    cluster="$(vb_pg_main_cluster)"
    if [[ -z "$cluster" ]]; then
        version="$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | cut -d/ -f5 | sort -V | tail -n 1)"
        [[ -n "$version" ]] || vb_die "no PostgreSQL server under /usr/lib/postgresql"
        vb_log "PostgreSQL: creating cluster $version/main on port $VB_PG_PORT"
        vb_as_root pg_createcluster "$version" main --port "$VB_PG_PORT" >/dev/null
        cluster="$(vb_pg_main_cluster)"
    fi
    read -r version port status <<<"$cluster"
    [[ "$port" == "$VB_PG_PORT" ]] ||
        vb_die "PostgreSQL cluster $version/main uses port $port, the tests need $VB_PG_PORT"

    vb_pg_trust_local "$version"
    if [[ "$status" == online ]]; then
        # Running (started by the package install just now, or not listening on TCP).
        vb_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    else
        vb_log "PostgreSQL: starting cluster $version/main"
        vb_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    ((was_online)) || VB_STARTED_PG="$version main"
    vb_wait_for vb_pg_ready ||
        vb_die "PostgreSQL did not come up on $VB_PG_HOST:$VB_PG_PORT (see /var/log/postgresql/)"
    vb_pg_ensure_db
}

# ---------------------------------------------------------------- Redis

vb_redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h "$VB_REDIS_HOST" -p "$VB_REDIS_PORT" ping 2>/dev/null)" == PONG ]]
    else
        vb_port_open "$VB_REDIS_HOST" "$VB_REDIS_PORT"
    fi
}

vb_ensure_redis() {
    if vb_redis_ready; then
        vb_log "Redis already answers on $VB_REDIS_HOST:$VB_REDIS_PORT: leaving it alone"
        return 0
    fi
    command -v redis-server >/dev/null 2>&1 || vb_apt_install redis-server
    # The package install may have started one already (an init script, or systemd).
    if ! vb_redis_ready; then
        vb_log "Redis: starting redis-server on $VB_REDIS_HOST:$VB_REDIS_PORT (keeps nothing on disk)"
        redis-server --daemonize yes --bind "$VB_REDIS_HOST" --port "$VB_REDIS_PORT" \
            --save '' --appendonly no --dir "${TMPDIR:-/tmp}" >/dev/null
    fi
    VB_STARTED_REDIS=1
    vb_wait_for vb_redis_ready || vb_die "Redis did not come up on $VB_REDIS_HOST:$VB_REDIS_PORT"
}

# ---------------------------------------------------------------- stop what we started

vb_services_stop() {
    if [[ -n "$VB_STARTED_REDIS" ]]; then
        vb_log "Redis: stopping the server this script started"
        redis-cli -h "$VB_REDIS_HOST" -p "$VB_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        VB_STARTED_REDIS=""
    fi
    if [[ -n "$VB_STARTED_PG" ]]; then
        local version cluster
        read -r version cluster <<<"$VB_STARTED_PG"
        vb_log "PostgreSQL: stopping cluster $version/$cluster, which this script started"
        vb_as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" stop -m fast || true
        VB_STARTED_PG=""
    fi
}

vb_services_check() {
    local rc=0
    if vb_pg_ready; then
        vb_log "PostgreSQL: answers on $VB_PG_HOST:$VB_PG_PORT"
    else
        vb_log "PostgreSQL: nothing on $VB_PG_HOST:$VB_PG_PORT"
        rc=1
    fi
    if vb_redis_ready; then
        vb_log "Redis: answers on $VB_REDIS_HOST:$VB_REDIS_PORT"
    else
        vb_log "Redis: nothing on $VB_REDIS_HOST:$VB_REDIS_PORT"
        rc=1
    fi
    return "$rc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        check) vb_services_check ;;
        start)
            vb_ensure_postgres
            vb_ensure_redis
            ;;
        *) vb_die "usage: scripts/services.sh check|start" ;;
    esac
fi
