#!/usr/bin/env bash
# Installs Debian's prometheus (the server only) for deploy/local/cluster.sh and its test, once;
# prints the path of the prometheus binary. Idempotent: does nothing when it is on the PATH.
# Debian's package would start a system service where systemd runs; the local cluster starts its
# own instance on its own port with its own configuration and data directory either way.
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y --no-install-recommends prometheus >&2 || {
        $sudo apt-get update >&2
        $sudo apt-get install -y --no-install-recommends prometheus >&2
    }
fi
command -v prometheus
