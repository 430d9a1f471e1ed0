#!/usr/bin/env bash
# Install what building JavaScript and C tools needs (sdk/js, sdk/c, keel-build's js and c
# modules, and the tests that build examples/{js,c} and plugins/js-exec from source).
# Idempotent and quiet; fast when everything is already there. The apt part needs root.
#
#   C:  clang, lld (wasm-ld), wasi-libc, compiler-rt for wasm32   (Debian bookworm: clang 14)
#   JS: Node.js + npm, then `npm ci` in sdk/js (componentize-js 0.23.0, rolldown; pinned by
#       sdk/js/package-lock.json, ~390 MB in sdk/js/node_modules)
set -euo pipefail
cd "$(dirname "$0")/../.."

apt_packages=()
command -v clang >/dev/null 2>&1 || apt_packages+=(clang)
command -v wasm-ld >/dev/null 2>&1 || apt_packages+=(lld)
[ -f /usr/lib/wasm32-wasi/libc.a ] || apt_packages+=(wasi-libc)
ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1 \
    || apt_packages+=(libclang-rt-14-dev-wasm32)
command -v node >/dev/null 2>&1 || apt_packages+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_packages+=(npm)
if [ ${#apt_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "js-c setup: need root to run: apt-get install ${apt_packages[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# sdk/js/node_modules, exactly as locked (Node.js 20.19+ or 22.12+: rolldown's requirement); skipped
# when what is installed was installed from this lock file.
if ! cmp -s sdk/js/package-lock.json sdk/js/node_modules/.keel-lock 2>/dev/null; then
    (cd sdk/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp sdk/js/package-lock.json sdk/js/node_modules/.keel-lock
fi
