#!/usr/bin/env bash
# The one command that runs all the tests:  ./test.sh [pytest args]
#
# Same setup as ./run.sh plus the `dev` extra; makes sure PostgreSQL (127.0.0.1:5432) and
# Redis (127.0.0.1:6379) answer, installing and starting them when they do not (and stopping
# at the end only the ones it started); installs Debian's chromium for the browser tests and
# nginx for the two-servers deployment test, and a C compiler for the capacity bench's C generator.
# Then `ruff check .` and pytest (every test, slow ones included). Exits with pytest's code,
# or 1 when pytest passed but ruff found problems.
set -euo pipefail
cd "$(dirname "$0")"

# shellcheck source=scripts/setup.sh
. scripts/setup.sh
# shellcheck source=scripts/services.sh
. scripts/services.sh

vb_setup dev

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
export VOICEBOT_CHROMIUM="${VOICEBOT_CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$VOICEBOT_CHROMIUM" ]]; then
    vb_apt_install chromium
    VOICEBOT_CHROMIUM=/usr/bin/chromium
fi
# The two-servers deployment test puts nginx (Debian's) in front of two `voicebot serve`s.
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || vb_apt_install nginx
# The capacity bench's C load generator (bench/media_load.c) is built with the system compiler.
command -v cc >/dev/null 2>&1 || vb_apt_install build-essential

trap vb_services_stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# A URL given in the environment points at a server of the caller's: use it as it is.
if [[ -z "${VOICEBOT_TEST_PG_URL:-}" ]]; then
    vb_ensure_postgres
    export VOICEBOT_TEST_PG_URL="postgresql://postgres@$VB_PG_HOST:$VB_PG_PORT/$VB_PG_DB"
fi
if [[ -z "${VOICEBOT_TEST_REDIS_URL:-}" ]]; then
    vb_ensure_redis
    export VOICEBOT_TEST_REDIS_URL="redis://$VB_REDIS_HOST:$VB_REDIS_PORT/0"
fi

ruff_rc=0
vb_log "ruff check ."
"$VENV/bin/ruff" check . || ruff_rc=$?

# Known vulnerabilities in the installed dependencies: fails on a finding, warns (and goes
# on) when the vulnerability service cannot be reached.
audit_rc=0
scripts/audit.sh || audit_rc=$?

pytest_args=(-q -ra)
if [[ -n "${CI:-}" ]]; then
    mkdir -p build
    pytest_args+=(--junitxml=build/junit.xml)
fi
vb_log "pytest ${pytest_args[*]} $*"
pytest_rc=0
"$VENV/bin/python" -m pytest "${pytest_args[@]}" "$@" || pytest_rc=$?

if [[ $pytest_rc -eq 0 && $ruff_rc -ne 0 ]]; then
    vb_warn "tests passed but ruff check failed"
    exit 1
fi
if [[ $pytest_rc -eq 0 && $audit_rc -ne 0 ]]; then
    vb_warn "tests passed but dependencies have known vulnerabilities (scripts/audit.sh)"
    exit 1
fi
exit "$pytest_rc"
