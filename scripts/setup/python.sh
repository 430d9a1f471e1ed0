#!/usr/bin/env bash
# Install what the Python guest builds need: componentize-py (PyPI, one self-contained wheel).
# Idempotent and quiet: a no-op (well under a second) when the pinned version is already installed.
# The version is pinned here and in host/build/src/python.rs (COMPONENTIZE_PY_VERSION); change both.
set -euo pipefail

version=0.25.1
python=${PYTHON:-python3}

if command -v componentize-py >/dev/null 2>&1 &&
    [ "$(componentize-py --version 2>/dev/null)" = "componentize-py $version" ]; then
    exit 0
fi
"$python" -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
    "componentize-py==$version"
# pyenv installs console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
componentize-py --version >/dev/null
