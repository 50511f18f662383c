#!/usr/bin/env bash
# Make Debian's chromium available for tests/test_browser.py, when this machine allows it.
# Never fails: without chromium the browser tests skip and say why.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [[ -x "$CHROMIUM" ]]; then
  exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ensure_chromium: $CHROMIUM is missing and this is not root with apt-get;" \
       "the browser tests will be skipped (install the 'chromium' package to run them)." >&2
  exit 0
fi
echo "ensure_chromium: installing Debian's chromium for the browser tests (about 30 s)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
     >/tmp/normcourse-chromium-install.log 2>&1; then
  echo "ensure_chromium: apt-get could not install chromium (see /tmp/normcourse-chromium-install.log);" \
       "the browser tests will be skipped." >&2
fi
exit 0
