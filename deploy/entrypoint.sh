#!/bin/sh
# meshintercept node agent (the DaemonSet's container entrypoint).
#
# On start: record this process's (host) PID for the CNI shim, install meshintercept-cni into
# the node's primary CNI config, and repair pods that started before it. Then re-run the
# idempotent install every MESHINTERCEPT_RECONCILE_SECONDS, which puts the plugin back when
# the cluster's network plugin rewrites its config and refreshes the service-account token.
# On SIGTERM/SIGINT: take the plugin out of the config (keeping the executable so runtimes can
# still run DEL for existing pods), tear interception down if MESHINTERCEPT_TEARDOWN_ON_STOP
# is true, and exit.
set -u

CONF_DIR=${MESHINTERCEPT_CNI_CONF_DIR:-/etc/cni/net.d}
BIN_DIR=${MESHINTERCEPT_CNI_BIN_DIR:-/opt/cni/bin}
PLUGIN_CONF=${MESHINTERCEPT_PLUGIN_CONF:-/etc/meshintercept/plugin.json}
PIDFILE=${MESHINTERCEPT_AGENT_PIDFILE:-/run/meshintercept/agent.pid}
INTERVAL=${MESHINTERCEPT_RECONCILE_SECONDS:-30}
REPAIR=${MESHINTERCEPT_REPAIR_ON_START:-true}
TEARDOWN=${MESHINTERCEPT_TEARDOWN_ON_STOP:-true}
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
    log "stopping: removing the plugin from $CONF_DIR"
    meshintercept cni uninstall --conf-dir "$CONF_DIR" --bin-dir "$BIN_DIR" --keep-binary || log "uninstall failed"
    if [ "$TEARDOWN" = true ]; then
        log "tearing down interception on this node"
        meshintercept disable --all || log "disable --all failed"
    fi
    rm -f "$PIDFILE"
    exit 0
}
trap stop TERM INT

mkdir -p "$(dirname "$PIDFILE")"
echo $$ > "$PIDFILE"

until install_plugin; do
    log "waiting for the cluster's network config in $CONF_DIR"
    sleep 5 &
    wait $!
done
if [ "$REPAIR" = true ]; then
    meshintercept cni repair --conf-dir "$CONF_DIR" --apply || log "repair left pods unfixed (see above)"
fi
log "ready"
while :; do
    sleep "$INTERVAL" &
    wait $!
    install_plugin >/dev/null || log "re-install failed"
done
