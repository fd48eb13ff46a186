#!/usr/bin/env bash
# Run a command with a Docker engine: installs Debian's docker.io (and debootstrap, for
# `make base-image`) when absent, starts `dockerd --bridge=none --iptables=false` when none
# answers (containers then use --network host: no bridge network, no iptables rules), and
# stops the daemon it started, by its PID, when the command ends. Fails, never skips, when
# no engine can be set up: the container tests must run on CI.
#
#   .ci/with-docker.sh make container-test
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
state=$(mktemp -d "${TMPDIR:-/tmp}/npo-dockerd.XXXXXX")
started=""

stop_dockerd() {
    if [[ -n "$started" ]] && kill -0 "$started" 2>/dev/null; then
        echo "with-docker: stopping the dockerd it started (pid $started)"
        kill -TERM "$started"
        for _ in $(seq 60); do kill -0 "$started" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$state"
}
trap stop_dockerd EXIT

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "with-docker: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    echo "with-docker: starting dockerd (log: $state/dockerd.log)"
    dockerd --bridge=none --iptables=false >"$state/dockerd.log" 2>&1 &
    started=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    if ! docker info >/dev/null 2>&1; then
        echo "with-docker: dockerd did not answer within 30 s:" >&2
        tail -20 "$state/dockerd.log" >&2
        exit 1
    fi
fi

"$@"
