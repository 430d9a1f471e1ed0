#!/bin/sh
# Smoke test of {{name}}: build it, install it into a scratch Keel home, call `greet`, compare.
set -eu
cd "$(dirname "$0")"
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
keel build . -o "$home/{{name}}.wasm"
keel --home "$home" install "$home/{{name}}.wasm" >/dev/null
got=$(keel --home "$home" call {{name}}/greet '{"name": " Ada "}')
if ! printf '%s' "$got" | grep -q '"greeting": *"Hello, Ada!"'; then
    echo "FAIL: keel call {{name}}/greet printed $got, expected {\"greeting\": \"Hello, Ada!\"}" >&2
    exit 1
fi
echo "ok: {{name}}/greet answered $got"
