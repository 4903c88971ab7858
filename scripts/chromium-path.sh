#!/usr/bin/env bash
# Print the path of a headless-capable Chromium for the report's browser test.
# Installs Debian's chromium package when missing (needs root and apt); prints nothing and
# exits 1 when none can be had, and the test then skips with that reason (fails under CI).
set -u
find_it() { command -v chromium || command -v chromium-browser; }
if ! find_it >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || exit 1
fi
find_it || exit 1
