#!/usr/bin/env bash
# Runs every mailferry test: unit, integration (real processes over the Maildir transport, kill -9 at every
# apply step) and live mail tests (a real Postfix + Dovecot started on 127.0.0.1 from a temporary
# directory) and the owner console's browser test (headless Chromium through chromedriver). Installs what
# the tests need first, when it is missing (Debian packages postfix, dovecot-imapd, dovecot-lmtpd, chromium,
# chromium-driver, with sudo when not root; no system-wide daemon is left running).
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/install-test-deps.sh ]; then
    scripts/install-test-deps.sh
fi

# The live tests share one mail server per run; stop it however the run ends.
if [ -x tests/mailserver/stop.sh ]; then
    trap 'MAILTEST_DIR=/tmp/mailtest-shared tests/mailserver/stop.sh >/dev/null 2>&1 || true' EXIT
fi

cargo test --all-targets "$@"
