#!/usr/bin/env bash
# Install the real MCP clients the MCP server's tests drive (host/cli/tests/mcp_clients.rs):
#   Python: the official SDK, PyPI `mcp` (pinned here)
#   Node:   the official TypeScript SDK, npm `@modelcontextprotocol/sdk` (pinned by
#           tests/mcp-clients/js/package-lock.json); needs node + npm (scripts/setup/js-c.sh)
# Idempotent and quiet; a no-op (~0.2 s) when both are installed as pinned.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=2.3.0
python=${PYTHON:-python3}

installed() {
    "$python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null || true
}

if [ "$(installed)" != "$version" ]; then
    "$python" -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
        "mcp==$version"
    if [ "$(installed)" != "$version" ]; then
        echo "scripts/setup/mcp.sh: mcp $version did not install" >&2
        exit 1
    fi
fi

js=tests/mcp-clients/js
if ! cmp -s "$js/package-lock.json" "$js/node_modules/.keel-lock" 2>/dev/null; then
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp "$js/package-lock.json" "$js/node_modules/.keel-lock"
fi
