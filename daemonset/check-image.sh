#!/bin/sh
# Runs the gatewayd image on this machine the way daemonset/daemonset.yaml runs it, and checks
# that it works. The checks: `gatewayd --version` and `check`, `gatewayd run` attaching its
# programs, /healthz and /readyz, `gatewayctl status`, and the connect hook counting a connect
# from the test cgroup. At the end `gatewayd uninstall` runs as daemonset/uninstall runs it.
#
# Usage (as root, from the repository root, after `cargo xtask image`):
#   daemonset/check-image.sh [IMAGE]        # IMAGE defaults to node-gateway:0.1.0
#
# Safety: the programs attach only to a cgroup this script creates (gw-image-check under the
# cgroup2 mount) and pin under /sys/fs/bpf/gw-image-check. The only target is 127.0.0.2:18080,
# served by a Python HTTP server this script starts; the proxy listens on 127.0.0.1:15001.
# Every container runs with --network=host, so podman creates no network. Both are removed at
# the end, also after a failure.
#
# Environment:
#   PODMAN_RUNTIME  OCI runtime for podman, e.g. runc where crun rejects a hybrid cgroup host
#   PODMAN_ULIMITS  extra --ulimit options, e.g. "--ulimit nofile=20000:20000" where podman's
#                   defaults exceed this machine's hard limits
#   SECCOMP         seccomp profile for every container (podman's --security-opt seccomp=)
#                   [default: the runtime's default, as seccompProfile RuntimeDefault]. The
#                   default profile of podman and CRI-O allows bpf() only with CAP_SYS_ADMIN,
#                   so gatewayd fails there with "Operation not permitted"; SECCOMP=unconfined
#                   matches the manifest's documented fallback.
#   CHECK_DIR       scratch directory [default: a new directory under /tmp]
set -eu

image=${1:-node-gateway:0.1.0}
name=gatewayd-image-check
scratch=${CHECK_DIR:-$(mktemp -d /tmp/gw-image-check.XXXXXX)}
podman="podman ${PODMAN_RUNTIME:+--runtime $PODMAN_RUNTIME}"
ulimits=${PODMAN_ULIMITS:-}

# The cgroup2 mount, read as gatewayd reads it: the first cgroup2 entry of mountinfo.
cgroup2=$(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' \
    /proc/self/mountinfo | head -n 1)
[ -n "$cgroup2" ] || { echo "check-image: no cgroup2 mount found" >&2; exit 1; }
test_cgroup=$cgroup2/gw-image-check
pins=/sys/fs/bpf/gw-image-check

fail() {
    echo "check-image: FAILED: $*" >&2
    exit 1
}

forwarding() {
    echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)" \
        "ipv6_forwarding=$(cat /proc/sys/net/ipv6/conf/all/forwarding)"
}

cleanup() {
    set +e
    [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null
    $podman stop --time 15 $name >/dev/null 2>&1
    $podman logs $name >"$scratch/gatewayd.log" 2>&1
    $podman rm --force $name >/dev/null 2>&1
    # As daemonset/uninstall runs it: CAP_BPF only, bpffs mounted.
    if [ -e "$pins" ]; then
        $podman run --rm --network=host $ulimits --read-only --read-only-tmpfs=false \
            --user 0:0 --cap-drop=ALL --cap-add=CAP_BPF --security-opt=no-new-privileges \
            ${SECCOMP:+--security-opt=seccomp=$SECCOMP} \
            --volume /sys/fs/bpf:/sys/fs/bpf:rslave \
            "$image" uninstall --bpffs "$pins"
    fi
    [ -e "$pins" ] && echo "check-image: $pins is still there" >&2
    rmdir "$test_cgroup" 2>/dev/null
    echo "check-image: cleaned up; $(forwarding); logs in $scratch/gatewayd.log"
}

echo "check-image: before: $(forwarding)"
mkdir -p "$scratch/config" "$scratch/policies" "$scratch/tls" "$scratch/signing" "$scratch/state"
if [ ! -e "$scratch/signing/signing.key" ]; then
    openssl genpkey -algorithm ed25519 -out "$scratch/signing/signing.key"
    openssl pkey -in "$scratch/signing/signing.key" -pubout -out "$scratch/signing.pub"
    chmod 0400 "$scratch/signing/signing.key"
fi
cat >"$scratch/config/gatewayd.yaml" <<EOF
proxy:
  listen_v4: "\${HOST_IP}:15001"
  drain_timeout: 5s
redirect:
  cgroup: /gw-image-check
  bpffs: $pins
  fail_mode: open
recording:
  dir: /var/lib/gateway
  fail_mode: open
  retention_days: 400
  signing_key: /etc/gateway/signing/signing.key
targets:
  - name: loopback-http
    address: 127.0.0.2
    port: 18080
    class: tcp
EOF

mkdir -p "$test_cgroup"
trap cleanup EXIT

# The DaemonSet's container: hostNetwork and hostPID, root with only BPF, NET_ADMIN and
# PERFMON, no privilege escalation, and a read-only root with no tmpfs added (as in
# Kubernetes). It has the same mounts and environment, and the seccomp profile of SECCOMP.
run_options="--network=host --pid=host $ulimits --read-only --read-only-tmpfs=false
    --user 0:0 --cap-drop=ALL --cap-add=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON
    --security-opt=no-new-privileges ${SECCOMP:+--security-opt=seccomp=$SECCOMP} --memory=1g
    --env NODE_NAME=$(hostname) --env HOST_IP=127.0.0.1 --env GATEWAY_LOG=info
    --volume $scratch/config:/etc/gateway/config:ro
    --volume $scratch/policies:/etc/gateway/policies:ro
    --volume $scratch/tls:/etc/gateway/tls:ro
    --volume $scratch/signing:/etc/gateway/signing:ro
    --volume /sys/fs/cgroup:/sys/fs/cgroup:ro
    --volume /sys/fs/bpf:/sys/fs/bpf:rslave
    --volume $scratch/state:/var/lib/gateway"

echo "check-image: gatewayd --version"
# shellcheck disable=SC2086
$podman run --rm $run_options "$image" --version || fail "gatewayd --version"
echo "check-image: gatewayd check"
# shellcheck disable=SC2086
$podman run --rm $run_options "$image" check --config /etc/gateway/config/gatewayd.yaml \
    || fail "gatewayd check"

echo "check-image: gatewayd run"
# shellcheck disable=SC2086
$podman run --detach --name $name $run_options "$image" \
    run --config /etc/gateway/config/gatewayd.yaml --log-format json >/dev/null

# The startup probe: /readyz every 2 s, up to 60 times.
ready=
for _ in $(seq 60); do
    if curl --silent --fail --max-time 2 http://127.0.0.1:15021/readyz >/dev/null; then
        ready=yes
        break
    fi
    [ "$($podman inspect --format '{{.State.Running}}' $name)" = true ] \
        || { $podman logs $name >&2; fail "gatewayd exited"; }
    sleep 2
done
[ -n "$ready" ] || { curl --silent http://127.0.0.1:15021/readyz >&2; fail "/readyz never returned 200"; }
echo "check-image: /readyz: $(curl --silent --show-error --fail http://127.0.0.1:15021/readyz)"
echo "check-image: /healthz: $(curl --silent --show-error --fail http://127.0.0.1:15021/healthz)" \
    || fail "/healthz"

echo "check-image: gatewayctl status"
$podman exec $name gatewayctl status --config /etc/gateway/config/gatewayd.yaml \
    || fail "gatewayctl status"

# The connect hook leaves connects from the host network namespace alone (pass_host_netns),
# and this client shares it, so the hook must count the connect and let it go direct.
# Redirection itself needs a pod network namespace: `cargo xtask test` covers it.
echo "check-image: a connection from the test cgroup to 127.0.0.2:18080"
mkdir -p "$scratch/www"
echo "hello from the check server" >"$scratch/www/index.html"
python3 -m http.server 18080 --bind 127.0.0.2 --directory "$scratch/www" \
    >"$scratch/http-server.log" 2>&1 &
server_pid=$!
sleep 1
host_netns_passes() {
    $podman exec $name gatewayctl stats --bpffs "$pins" | awk '$1 == "pass_host_netns" { print $2 }'
}
passes_before=$(host_netns_passes)
body=$(sh -c "echo \$\$ >'$test_cgroup/cgroup.procs' && exec curl --silent --show-error --max-time 5 http://127.0.0.2:18080/") \
    || fail "request from the test cgroup"
echo "check-image: response: $body"
[ "$body" = "hello from the check server" ] || fail "unexpected response"
passes_after=$(host_netns_passes)
echo "check-image: pass_host_netns $passes_before -> $passes_after"
[ "$passes_after" -gt "$passes_before" ] || fail "the connect hook did not count the connect"
$podman exec $name gatewayctl stats --bpffs "$pins" || fail "gatewayctl stats"

echo "check-image: all checks passed"
