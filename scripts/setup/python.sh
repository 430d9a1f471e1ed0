#!/usr/bin/env bash
# Install what the Python guest builds need: componentize-py (PyPI, one self-contained wheel).
# Idempotent and quiet: a no-op (~0.1 s) when the pinned version is already installed.
# The version is pinned here and in host/build/src/python.rs (COMPONENTIZE_PY_VERSION); change both.
# keel-build runs the `componentize-py` script from PATH, or else `python3`'s componentize_py module.
set -euo pipefail

version=0.25.1
python=${PYTHON:-python3}

installed() {
    "$python" -c 'import importlib.metadata as m; print(m.version("componentize-py"))' 2>/dev/null || true
}

if [ "$(installed)" = "$version" ]; then
    exit 0
fi
"$python" -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
    "componentize-py==$version"
# pyenv puts console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
if [ "$(installed)" != "$version" ]; then
    echo "scripts/setup/python.sh: componentize-py $version did not install" >&2
    exit 1
fi
