#!/usr/bin/env bash
# Make sure Debian's Chromium is installed (for the browser tests of examples/web): install it
# with apt-get when missing. Another apt-get may hold the lock: wait for it (up to 10 minutes),
# never kill it. Prints the path of the chromium binary on success.
set -u
found() { command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null; }
if path=$(found); then echo "$path"; exit 0; fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "error: chromium is missing and apt-get needs root (apt-get install chromium)" >&2; exit 1
fi
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
export DEBIAN_FRONTEND=noninteractive
lock_wait="-o DPkg::Lock::Timeout=600"
echo "installing chromium with apt-get (once per machine)..." >&2
for attempt in 1 2 3; do
  # An empty or stale package list finds nothing: update it first.
  if $sudo apt-get $lock_wait update -qq >/dev/null 2>&1 &&
     $sudo apt-get $lock_wait install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    break
  fi
  echo "apt-get install chromium failed (attempt $attempt); retrying in 20 s" >&2
  sleep 20
done
if path=$(found); then echo "$path"; exit 0; fi
echo "error: could not install chromium (apt-get install chromium)" >&2
exit 1
