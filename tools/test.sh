#!/usr/bin/env bash
# The whole test suite, with the outside programs some tests run, each
# installed here when missing so that a fresh machine needs nothing else:
# - schemathesis (PyPI) checks the gateway's OpenAPI document against the
#   running gateway and fuzzes its routes;
# - Debian's Chromium, driven by playwright-core (npm, pinned in
#   tools/e2e/package-lock.json; it never downloads a browser of its own),
#   opens the dashboard for the end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "tools/test.sh: installing schemathesis (PyPI) for the gateway's OpenAPI test" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi
if [ ! -x /usr/bin/chromium ]; then
    echo "tools/test.sh: installing Debian's chromium for the dashboard's browser test" >&2
    sudo_if_needed=""
    [ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tools/e2e/node_modules/playwright-core ]; then
    echo "tools/test.sh: installing playwright-core (npm) for the dashboard's browser test" >&2
    (cd tools/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
exec cargo test --workspace --locked "$@"
