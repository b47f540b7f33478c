#!/usr/bin/env bash
# One command to install everything and serve:  ./run.sh [extra `voicebot serve` args]
#
# The first run installs the Debian packages it needs (apt-get, only when missing), creates
# .venv and pip-installs the project with the embedded local LLM (llama-cpp-python compiles
# from source: ~9 minutes on 2 cores, once). Later runs skip the install while pyproject.toml
# is unchanged. Then it migrates the database and starts the server.
#
# Environment: HOST (default 0.0.0.0), PORT (default 8000), settings from .env or the
# environment (see .env.example); VENV, PYTHON, VOICEBOT_SKIP_LOCAL_LLM=1: see scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")"

# shellcheck source=scripts/setup.sh
. scripts/setup.sh
vb_setup

vb_log "voicebot db upgrade"
"$VENV/bin/voicebot" db upgrade

vb_log "voicebot serve on ${HOST:-0.0.0.0}:${PORT:-8000}"
exec "$VENV/bin/voicebot" serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
