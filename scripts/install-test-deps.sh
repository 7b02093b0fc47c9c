#!/usr/bin/env bash
# install-test-deps.sh - install what the tests need: Postfix + Dovecot (the live mail tests) and headless
# Chromium with its WebDriver (the console's browser test), Debian/Ubuntu only.
#
# Idempotent: a fast no-op when everything is already installed. Never starts system-wide
# daemons: a policy-rc.d that refuses every service start is put in place for the install
# (and removed again if this script created it), and Postfix is preseeded with
# "No configuration", so there is no /etc/postfix/main.cf and nothing listens on :25/:143/:993.
# The test harness (tests/mailserver/start.sh) runs its own instances on 127.0.0.1 only.
#
# Runs apt-get as root, through sudo when not root. Env: INSTALL_TEST_DEPS_NO_UPDATE=1 skips `apt-get update`.
set -euo pipefail

have_all() {
  command -v postfix >/dev/null 2>&1 && command -v postconf >/dev/null 2>&1 \
    && command -v dovecot >/dev/null 2>&1 \
    && [ -x /usr/lib/dovecot/imap ] && [ -x /usr/lib/dovecot/lmtp ] \
    && command -v openssl >/dev/null 2>&1 && command -v flock >/dev/null 2>&1 \
    && command -v runuser >/dev/null 2>&1 \
    && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]
}

if have_all; then
  echo "install-test-deps: postfix, dovecot-imapd, dovecot-lmtpd, chromium, chromium-driver already installed"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: must run as root, or with sudo (apt-get install)" >&2; exit 1; }
  exec sudo --preserve-env=INSTALL_TEST_DEPS_NO_UPDATE "$0" "$@"
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-test-deps: apt-get not found; install postfix, dovecot-imapd, dovecot-lmtpd, openssl, chromium, chromium-driver by hand" >&2; exit 1; }

# Refuse service starts during the install (exit 101 = "action forbidden" for invoke-rc.d).
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

export DEBIAN_FRONTEND=noninteractive
if [ "${INSTALL_TEST_DEPS_NO_UPDATE:-0}" != 1 ]; then
  apt-get update -q
fi
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 \
  postfix dovecot-imapd dovecot-lmtpd openssl util-linux iproute2 chromium chromium-driver

have_all || { echo "install-test-deps: packages installed but postfix/dovecot/chromium binaries still missing" >&2; exit 1; }
echo "install-test-deps: done"
