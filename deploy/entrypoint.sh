#!/bin/sh
# meshintercept node agent (the DaemonSet's container entrypoint).
#
# On start: record this process's (host) PID for the CNI shim, take the node over from what an
# earlier agent left ('meshintercept upgrade': records, rules and pinned programs outlive the
# agent; programs of the same eBPF layout are reused, another layout is replaced with every pod
# intercepted throughout), install meshintercept-cni into the node's primary CNI config, repair
# pods that started before it, and serve metrics on
# MESHINTERCEPT_METRICS_ADDRESS (empty: off). Then re-run the idempotent install every
# MESHINTERCEPT_RECONCILE_SECONDS, which puts the plugin back when the cluster's network plugin
# rewrites its config and refreshes the service-account token.
#
# On SIGTERM/SIGINT (every rolling upgrade): leave every pod as it is and exit. Interception
# lives in the kernel and keeps working; the plugin stays in the CNI config, and while no agent
# runs its shim answers ADD with "try again later", so no new pod starts unintercepted.
# Only an uninstall tears down: MESHINTERCEPT_UNINSTALL_ON_STOP=true (set it, then delete the
# DaemonSet) takes the plugin out of the config (keeping the executable so runtimes can still
# run DEL) and runs 'meshintercept disable --all'.
set -u

CONF_DIR=${MESHINTERCEPT_CNI_CONF_DIR:-/etc/cni/net.d}
BIN_DIR=${MESHINTERCEPT_CNI_BIN_DIR:-/opt/cni/bin}
PLUGIN_CONF=${MESHINTERCEPT_PLUGIN_CONF:-/etc/meshintercept/plugin.json}
PIDFILE=${MESHINTERCEPT_AGENT_PIDFILE:-/run/meshintercept/agent.pid}
INTERVAL=${MESHINTERCEPT_RECONCILE_SECONDS:-30}
REPAIR=${MESHINTERCEPT_REPAIR_ON_START:-true}
# MESHINTERCEPT_TEARDOWN_ON_STOP is the older name of the same switch.
UNINSTALL=${MESHINTERCEPT_UNINSTALL_ON_STOP:-${MESHINTERCEPT_TEARDOWN_ON_STOP:-false}}
METRICS=${MESHINTERCEPT_METRICS_ADDRESS-}
METRICS_PID=
SA_FLAG=
if [ "${MESHINTERCEPT_KUBECONFIG_FROM_SA:-false}" = true ]; then
    SA_FLAG=--kubeconfig-from-serviceaccount
fi

log() { echo "meshintercept-agent: $*" >&2; }

install_plugin() {
    # shellcheck disable=SC2086 # SA_FLAG is empty or one word
    meshintercept cni install --conf-dir "$CONF_DIR" --bin-dir "$BIN_DIR" --plugin-conf "$PLUGIN_CONF" \
        --shim agent $SA_FLAG
}

stop() {
    trap - TERM INT
    if [ -n "$METRICS_PID" ]; then kill "$METRICS_PID" 2>/dev/null; fi
    if [ "$UNINSTALL" = true ]; then
        log "uninstalling: removing the plugin from $CONF_DIR"
        meshintercept cni uninstall --conf-dir "$CONF_DIR" --bin-dir "$BIN_DIR" --keep-binary || log "uninstall failed"
        log "tearing down interception on this node"
        meshintercept disable --all || log "disable --all failed"
    else
        log "stopping: every pod stays intercepted; new pods wait for the next agent"
    fi
    rm -f "$PIDFILE"
    exit 0
}
trap stop TERM INT

mkdir -p "$(dirname "$PIDFILE")"
echo $$ > "$PIDFILE"

# Before the plugin: a pod's ADD must find one build owning the node.
meshintercept upgrade || log "upgrade left objects of an earlier build in place (see above)"

until install_plugin; do
    log "waiting for the cluster's network config in $CONF_DIR"
    sleep 5 &
    wait $!
done
if [ "$REPAIR" = true ]; then
    meshintercept cni repair --conf-dir "$CONF_DIR" --apply || log "repair left pods unfixed (see above)"
fi
if [ -n "$METRICS" ]; then
    meshintercept metrics --serve "$METRICS" &
    METRICS_PID=$!
    log "metrics on $METRICS/metrics"
fi
log "ready"
while :; do
    sleep "$INTERVAL" &
    wait $!
    install_plugin >/dev/null || log "re-install failed"
done
