#!/usr/bin/env bash
# Installs Debian's Chromium for tests/test_browser.py when it is missing and apt-get can run (root on a
# Debian/Ubuntu CI machine); a no-op otherwise, in which case the browser test skips with the reason.
# Playwright drives this system browser through `executable_path`: never `playwright install`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci_browser_setup: no apt-get here; the browser test will skip" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=sudo
    else
        echo "ci_browser_setup: not root and no passwordless sudo; the browser test will skip" >&2
        exit 0
    fi
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "ci_browser_setup: installing chromium failed; the browser test will skip" >&2
fi
exit 0
