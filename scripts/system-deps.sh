#!/usr/bin/env bash
# System packages the tests need beyond the Python ones: Debian's Prometheus (the server and
# promtool) and Alertmanager, run for real by tests/monitoring and tests/services/alerts; buildah
# and debootstrap, which tests/deploy/test_image.py and `make images` build service images with.
#
#   scripts/system-deps.sh          # install what is missing (idempotent; instant when present)
#   scripts/system-deps.sh --check  # exit 1 and name what is missing, install nothing
#
# Needs root (or sudo) and an apt-based system (Debian 12 ships prometheus 2.42,
# prometheus-alertmanager 0.25 and buildah 1.28). On other systems install the same binaries by hand and put them
# on PATH; the tests that need them skip with a line saying which binary is missing.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
    || need+=(prometheus-alertmanager)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # 7.x, built with TLS: the ACL and TLS tests
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
# de-duplicate
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u | sed '/^$/d')

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "missing system packages: ${need[*]} (run scripts/system-deps.sh)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get here; install ${need[*]} by hand (the tests that need them skip)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "system-deps: not root and no password-less sudo; install ${need[*]} by hand (the tests that need them skip)" >&2
        exit 0
    fi
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Packages start their daemons through invoke-rc.d; the tests run their own, so forbid that
# (exit 101 = "action not allowed") for the duration of the install.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && made_policy=1
fi
trap 'if [ "$made_policy" = 1 ]; then $SUDO rm -f "$policy"; fi' EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
