#!/usr/bin/env bash
# Headless Chromium for the labeling page's browser test. Debian's package; nothing downloads a browser.
# Failing here only makes that one test skip (with its reason); it never fails set-up.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    && echo "installed chromium" || echo "could not install chromium: the browser test will skip"
else
  echo "chromium missing and not root: the browser test will skip"
fi
