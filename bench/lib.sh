# shellcheck shell=bash
# Shared by bench/run and bench/profiles (sourced, not run): installing the measuring tools,
# a throwaway PostgreSQL cluster, and small number helpers. Not responsible for any measurement.
#
# The cluster follows scripts/demo and tests/support: initdb into a temp dir (as the `postgres`
# OS user when root, since initdb refuses root), a free port on 127.0.0.1 AND a private unix
# socket dir, stopped and deleted on exit by bench_cleanup (the callers trap it).

# The caller's connection settings must not leak into a measurement.
for var in $(env | sed -n 's/^\(PG[A-Z_]*\|HEIMDALL_[A-Z_]*\|DATABASE_URL\)=.*/\1/p'); do
    unset "$var"
done

bench_say() { printf '== %s\n' "$*" >&2; }
bench_die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# apt-get install for the packages named, as root or through sudo.
bench_apt() {
    if [ "$(id -u)" -eq 0 ]; then
        sudo=
    elif command -v sudo >/dev/null 2>&1; then
        sudo=sudo
    else
        bench_die "run 'apt-get install -y $*' as root, then try again"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        bench_die "no apt-get here; install $* with your package manager"
    bench_say "installing Debian's $* (not found here)"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null 2>&1; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    fi
}

# hyperfine, GNU time and the PostgreSQL server binaries (through scripts/ensure-deps). Sets
# PG_BIN: Debian's /usr/bin/psql is a Perl wrapper that costs more than the query, so psql is
# called from the server's bin dir.
bench_deps() {
    missing=
    command -v hyperfine >/dev/null 2>&1 || missing=hyperfine
    [ -x /usr/bin/time ] || missing="$missing time"
    # shellcheck disable=SC2086 # a list of package names
    [ -z "$missing" ] || bench_apt $missing
    scripts/ensure-deps
    if command -v initdb >/dev/null 2>&1; then
        PG_BIN=$(dirname "$(readlink -f "$(command -v initdb)")")
    else
        PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    fi
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/psql" ] ||
        bench_die "initdb or psql not found (looked in ${PG_BIN:-nothing}); run 'apt-get install postgresql'"
    PSQL=$PG_BIN/psql
}

# Starts the cluster. Sets BENCH_DIR (temp dir, also the socket dir), PG_PORT, PG_USER, PG_LOG,
# URL_TCP and URL_UNIX (libpq URLs without spaces, which heimdall, the postgres crate and psql
# all accept).
bench_start_cluster() {
    BENCH_DIR=$(mktemp -d /tmp/heimdall-bench.XXXXXX)
    mkdir "$BENCH_DIR/pg"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres "$BENCH_DIR/pg"
        chmod 755 "$BENCH_DIR"
        as_server() { timeout 120 runuser -u postgres -- "$@"; }
        PG_USER=postgres
    else
        as_server() { timeout 120 "$@"; }
        PG_USER=$(id -un)
    fi
    local sock=$BENCH_DIR/pg
    PG_LOG=$sock/server.log
    as_server "$PG_BIN/initdb" -D "$sock/data" --auth=trust -U "$PG_USER" -E UTF8 \
        --no-locale --no-sync >/dev/null
    # A free port: pick one nobody listens on, and try another if the server loses the race.
    local attempt
    for attempt in 1 2 3 4 5; do
        PG_PORT=$((20000 + ($$ * 7 + attempt * 7919 + RANDOM) % 40000))
        if grep -qi ":$(printf '%04X' "$PG_PORT") 00000000:0000 0A" /proc/net/tcp 2>/dev/null; then
            continue
        fi
        if as_server "$PG_BIN/pg_ctl" -D "$sock/data" -w -t 60 -l "$PG_LOG" \
            -o "$(bench_server_options)" start >/dev/null; then
            URL_TCP="postgresql://$PG_USER@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
            URL_UNIX="postgresql://$PG_USER@/postgres?host=$sock&port=$PG_PORT&sslmode=disable"
            bench_wait_lock_delay
            return 0
        fi
    done
    tail -n 20 "$PG_LOG" >&2 || true
    bench_die "the bench PostgreSQL did not start"
}

# The server's command line; extra `-c name=value` options given here come last, and so win.
bench_server_options() {
    echo "-p $PG_PORT -k $BENCH_DIR/pg -c listen_addresses=127.0.0.1 -c fsync=off" \
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        "-c log_line_prefix='%a '" "$@"
}

# Restarts the cluster (fast shutdown: its clients are cut off) with extra server options, e.g.
# `bench_restart_cluster -c max_connections=100`; without any, as bench_start_cluster started it.
bench_restart_cluster() {
    as_server "$PG_BIN/pg_ctl" -D "$BENCH_DIR/pg/data" -w -t 60 -m fast -l "$PG_LOG" \
        -o "$(bench_server_options "$@")" restart >/dev/null ||
        bench_die "the bench PostgreSQL did not restart with: $*"
    bench_wait_lock_delay
}

# A server that came up less than heimdall's lock-delay ago (22s with the default flags) makes
# every run hold its lock that long before its command starts. Waits that out after each start,
# so the figures show what every run pays (reading when the server came up), not the wait.
bench_wait_lock_delay() {
    local left
    left=$(bench_sql "SELECT ceil(greatest(0, 23 - extract(epoch FROM now() - pg_postmaster_start_time())))")
    bench_say "waiting ${left}s, until the server is older than heimdall's lock-delay"
    sleep "$left"
}

# Stops the server at once and removes everything; kills what the caller registered in
# BENCH_PIDS. Safe to call twice.
bench_cleanup() {
    local pid
    for pid in ${BENCH_PIDS:-}; do
        kill "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=
    if [ -n "${BENCH_DIR:-}" ] && [ -d "$BENCH_DIR" ]; then
        as_server "$PG_BIN/pg_ctl" -D "$BENCH_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$BENCH_DIR"
    fi
    BENCH_DIR=
}

# psql as a client of the bench cluster: one value per line, no psqlrc.
bench_sql() {
    timeout 120 "$PSQL" -X -q -At -d "$URL_UNIX" -c "$1"
}

# Float arithmetic and formatting without python: `calc '2 * 3.5'`, `fmt 2 1.2345`.
calc() { awk "BEGIN { print $1 }"; }
fmt() { awk -v d="$1" -v x="$2" 'BEGIN { printf "%.*f", d, x }'; }
# pass if $1 is true (an awk expression), else miss.
verdict() { awk "BEGIN { print (($1) ? \"pass\" : \"**miss**\") }"; }

# Field $2 (mean, stddev, median, user, system, min, max) of command $3 in hyperfine CSV $1, in
# milliseconds.
hf() {
    awk -F, -v want="$2" -v name="$3" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $1 == name { printf "%.3f", $(col[want]) * 1000 }' "$1"
}
