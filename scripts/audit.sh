#!/usr/bin/env bash
# Known vulnerabilities in the installed dependencies: pip-audit over the virtualenv's
# site-packages, against PyPI's vulnerability data.
#
#   scripts/audit.sh            (CI runs it from ./test.sh)
#
# Exit 1 when a dependency has a known vulnerability (each one is listed). When the service
# cannot be reached, or cannot tell about some packages (a mirror without vulnerability data),
# it says so in a WARNING and exits 0: no answer is not a finding. pip-audit comes from the
# `dev` extra when installed, else from its own small virtualenv under build/ (kept out of the
# project's environment, which is what is audited).
#
# Environment: VENV=<dir> (default <repo>/.venv), PIP_AUDIT_VERSION (default below).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh

VENV="${VENV:-$VB_ROOT/.venv}"
PIP_AUDIT_VERSION="${PIP_AUDIT_VERSION:-2.10.1}"
[[ -x "$VENV/bin/python" ]] || vb_die "no virtualenv at $VENV (run ./test.sh or scripts/setup.sh)"

audit="$VENV/bin/pip-audit"
if [[ ! -x "$audit" ]]; then
    tool="$VB_ROOT/build/audit-venv"
    if [[ ! -x "$tool/bin/pip-audit" ]]; then
        vb_log "installing pip-audit $PIP_AUDIT_VERSION into $tool"
        if ! { python3 -m venv "$tool" && "$tool/bin/pip" install -q "pip-audit==$PIP_AUDIT_VERSION"; } >&2; then
            vb_warn "pip-audit could not be installed: dependencies NOT audited"
            exit 0
        fi
    fi
    audit="$tool/bin/pip-audit"
fi

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p build
report="build/pip-audit.json"
log="build/pip-audit.log"
rm -f "$report"
vb_log "pip-audit over $site"
rc=0
"$audit" --path "$site" --skip-editable --progress-spinner off --format json -o "$report" \
    >"$log" 2>&1 || rc=$?

if [[ ! -s "$report" ]]; then
    # No report: the tool stopped before answering (usually the service is unreachable).
    vb_warn "pip-audit could not reach its vulnerability service (exit $rc): dependencies NOT audited"
    grep -E "Error|error:" "$log" | tail -n 3 >&2 || true
    exit 0
fi

"$VENV/bin/python" - "$report" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
deps = report.get("dependencies", [])
found = [(d["name"], d.get("version", "?"), v) for d in deps for v in d.get("vulns", [])]
skipped = [d["name"] for d in deps if "skip_reason" in d]
audited = len(deps) - len(skipped)
for name, version, vuln in found:
    fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
    print(f"VULNERABLE: {name} {version}: {vuln.get('id')} (fixed in: {fixes})", file=sys.stderr)
if skipped:
    print(f"WARNING: the vulnerability service could not tell about {len(skipped)} of "
          f"{len(deps)} packages (not in its data, e.g. a private mirror): "
          f"{', '.join(sorted(skipped)[:8])}{' ...' if len(skipped) > 8 else ''}",
          file=sys.stderr)
print(f"==> pip-audit: {audited} packages audited, {len(found)} known vulnerabilities",
      file=sys.stderr)
sys.exit(1 if found else 0)
PY
