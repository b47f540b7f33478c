# shellcheck shell=bash
# Helpers shared by scripts/setup.sh and scripts/services.sh: logging, root, apt-get.
# Sourced, never run. Safe to source more than once.

[[ -n "${VB_COMMON_LOADED:-}" ]] && return 0
VB_COMMON_LOADED=1

# The repository root (this file lives in <root>/scripts/).
VB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VB_ROOT

vb_log() { printf '==> %s\n' "$*" >&2; }
vb_warn() { printf 'WARNING: %s\n' "$*" >&2; }
vb_die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when we are root, else through sudo.
vb_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        vb_die "need root for: $* (run as root or install sudo)"
    fi
}

vb_deb_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# Install Debian packages that are not installed yet; `apt-get update` once per run, only
# when something is actually missing.
vb_apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        vb_deb_installed "$pkg" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        vb_die "missing system packages: ${missing[*]} (no apt-get here: install them yourself)"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)
    if [[ -z "${VB_APT_UPDATED:-}" ]]; then
        vb_log "apt-get update"
        vb_as_root "${apt[@]}" update
        VB_APT_UPDATED=1
    fi
    vb_log "apt-get install ${missing[*]}"
    vb_as_root "${apt[@]}" install -y "${missing[@]}"
}
