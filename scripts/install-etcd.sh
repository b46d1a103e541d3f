#!/usr/bin/env bash
# Installs Debian's etcd-server (etcd 3.4, v3 API) for the cluster tests, once; prints the
# path of the etcd binary. Idempotent: does nothing when etcd is already on the PATH.
set -euo pipefail
if ! command -v etcd >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y --no-install-recommends etcd-server >&2 || {
        $sudo apt-get update >&2
        $sudo apt-get install -y --no-install-recommends etcd-server >&2
    }
fi
command -v etcd
