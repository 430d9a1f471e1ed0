#!/usr/bin/env bash
# Install what the approvals-page browser test needs (host/server/tests/web.rs): Debian's
# `chromium` (headless) and `node`/`npm`, then `npm ci` in tests/web (playwright-core, pinned by
# tests/web/package-lock.json; it drives the system Chromium, so no browser download).
# Idempotent and quiet; fast when everything is already there. The apt part needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

apt_packages=()
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
command -v node >/dev/null 2>&1 || apt_packages+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_packages+=(npm)
if [ ${#apt_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "server setup: need root to run: apt-get install ${apt_packages[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# tests/web/node_modules, exactly as locked; skipped when installed from this lock file.
if ! cmp -s tests/web/package-lock.json tests/web/node_modules/.keel-lock 2>/dev/null; then
    (cd tests/web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp tests/web/package-lock.json tests/web/node_modules/.keel-lock
fi
