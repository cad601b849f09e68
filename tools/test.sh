#!/usr/bin/env bash
# The whole test suite, with the outside programs some tests run:
# schemathesis (PyPI) checks the gateway's OpenAPI document against the
# running gateway and fuzzes its routes. Installed here when missing, so
# that a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "tools/test.sh: installing schemathesis (PyPI) for the gateway's OpenAPI test" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi
exec cargo test --workspace --locked "$@"
