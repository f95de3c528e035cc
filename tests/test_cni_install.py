"""`meshintercept cni install` / `uninstall`: the node's primary network config is edited
minimally and restored byte for byte, a .conf becomes a conflist and comes back, the
executable shim is installed and runs the plugin, and a bad plugin block is refused before
anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from meshintercept.cni import conflist, install
from meshintercept.cni.cli import cni
from meshintercept.errors import EnvironmentMissing, UsageError

FLANNEL = """{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"""
CALICO_TABS_CRLF = ('{\r\n\t"name": "k8s-pod-network",\r\n\t"cniVersion": "0.3.1",\r\n\t"plugins": [\r\n\t\t{\r\n'
                    '\t\t\t"type": "calico",\r\n\t\t\t"log_level": "info",\r\n\t\t\t"mtu": 1440\r\n\t\t},\r\n'
                    '\t\t{"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}\r\n\t]\r\n}')
ONE_LINE = '{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"ptp","ipMasq":true,"ipam":{"type":"host-local","subnet":"10.231.99.0/24"}}]}'
ODD = ('{ "plugins" : [ { "type" : "bridge" , "note": "a \\"quoted\\" ] } [ string" } ] ,\n'
       '  "name" : "odd", "cniVersion" : "1.1.0", "x": 1.50e+2 }\n')
PLAIN_CONF = '{\n    "cniVersion": "0.4.0",\n    "name": "mynet",\n    "type": "bridge",\n    "bridge": "cni0",\n    "ipam": {"type": "host-local", "subnet": "10.231.98.0/24"}\n}\n'

BLOCK = {"mode": "iptables", "exclude_outbound_ports": [22, 53], "exclude_outbound_cidrs": ["10.231.200.0/24"]}


def read(path) -> str:
    with open(path, newline="") as f:
        return f.read()


def write(path, text: str) -> None:
    with open(path, "w", newline="") as f:
        f.write(text)


@pytest.fixture
def dirs(tmp_path):
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    return str(conf_dir), str(bin_dir)


@pytest.mark.parametrize("text", [FLANNEL, CALICO_TABS_CRLF, ONE_LINE, ODD], ids=["flannel", "calico-tabs-crlf", "one-line", "odd"])
def test_install_appends_and_uninstall_restores_bytes(dirs, text):
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    write(path, text)
    os.chmod(path, 0o600)
    result = install.install(conf_dir, bin_dir, BLOCK)
    assert result["changed"] and result["conflist"] == path
    new = read(path)
    doc = json.loads(new)
    assert doc["plugins"][:-1] == json.loads(text)["plugins"]
    assert doc["plugins"][-1] == {"type": "meshintercept-cni", **BLOCK}
    assert new.startswith(text[: text.index("[")])  # everything before the list untouched
    assert ("\r\n" in new) == ("\r\n" in text)
    assert os.stat(path).st_mode & 0o777 == 0o600

    stat = os.stat(path)
    again = install.install(conf_dir, bin_dir, BLOCK)
    assert not again["changed"] and read(path) == new and os.stat(path).st_ino == stat.st_ino

    result = install.uninstall(conf_dir, bin_dir)
    assert result["changed"]
    assert read(path) == text
    assert os.listdir(conf_dir) == ["10-net.conflist"]  # no temp files left
    assert not os.path.exists(os.path.join(bin_dir, "meshintercept-cni"))
    assert not install.uninstall(conf_dir, bin_dir)["changed"]


def test_changed_block_replaces_ours_in_place(dirs):
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    write(path, FLANNEL)
    install.install(conf_dir, bin_dir, BLOCK)
    install.install(conf_dir, bin_dir, {"mode": "iptables", "proxy_uid": 1337})
    plugins = json.loads(read(path))["plugins"]
    assert [p["type"] for p in plugins] == ["flannel", "portmap", "meshintercept-cni"]
    assert plugins[-1] == {"type": "meshintercept-cni", "mode": "iptables", "proxy_uid": 1337}
    install.uninstall(conf_dir, bin_dir)
    assert read(path) == FLANNEL


def test_duplicates_left_by_others_are_collapsed(dirs):
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    doc = json.loads(FLANNEL)
    doc["plugins"] += [{"type": "meshintercept-cni"}, {"type": "meshintercept-cni", "mode": "iptables"}]
    write(path, json.dumps(doc, indent=2))
    install.install(conf_dir, bin_dir, BLOCK)
    types = [p["type"] for p in json.loads(read(path))["plugins"]]
    assert types == ["flannel", "portmap", "meshintercept-cni"]


def test_primary_is_first_by_name_and_others_are_left_alone(dirs):
    conf_dir, bin_dir = dirs
    write(os.path.join(conf_dir, "20-other.conflist"), ONE_LINE)
    write(os.path.join(conf_dir, "10-net.conflist"), FLANNEL)
    write(os.path.join(conf_dir, "05-notes.txt"), "not a network config")
    write(os.path.join(conf_dir, install.KUBECONFIG_NAME), "{}")  # no config extension: never primary
    result = install.install(conf_dir, bin_dir, BLOCK)
    assert result["conflist"] == os.path.join(conf_dir, "10-net.conflist")
    assert read(os.path.join(conf_dir, "20-other.conflist")) == ONE_LINE
    state = install.status(conf_dir, bin_dir)
    assert state["installed"] and state["plugin"]["mode"] == "iptables" and state["also_in"] == []


def test_plain_conf_becomes_conflist_and_comes_back(dirs):
    conf_dir, bin_dir = dirs
    conf = os.path.join(conf_dir, "10-mynet.conf")
    write(conf, PLAIN_CONF)
    result = install.install(conf_dir, bin_dir, BLOCK)
    target = os.path.join(conf_dir, "10-mynet.conflist")
    assert result["conflist"] == target
    # The runtime now loads the conflist first; the original is out of its way.
    assert conflist.config_files(conf_dir) == [target]
    doc = json.loads(read(target))
    assert doc["name"] == "mynet" and doc["cniVersion"] == "0.4.0"
    assert doc["plugins"][0] == json.loads(PLAIN_CONF)
    assert doc["plugins"][1]["type"] == "meshintercept-cni"
    assert not install.install(conf_dir, bin_dir, BLOCK)["changed"]  # idempotent on the converted file

    install.uninstall(conf_dir, bin_dir)
    assert sorted(os.listdir(conf_dir)) == ["10-mynet.conf"]
    assert read(conf) == PLAIN_CONF


def test_bad_block_is_refused_before_anything_is_written(dirs):
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    write(path, FLANNEL)
    for bad, words in [({"outbound_port": 0}, "out of range"), ({"mode": "nope"}, "available modes"),
                       ({"outbond_port": 1}, "unknown field")]:
        with pytest.raises(UsageError, match=words):
            install.install(conf_dir, bin_dir, bad)
    assert read(path) == FLANNEL and not os.path.exists(bin_dir)


def test_unsupported_conflist_version_is_refused(dirs):
    conf_dir, bin_dir = dirs
    write(os.path.join(conf_dir, "10-net.conflist"), FLANNEL.replace('"1.0.0"', '"0.2.0"'))
    with pytest.raises(UsageError, match="0.2.0 is not supported"):
        install.install(conf_dir, bin_dir, BLOCK)


def test_empty_conf_dir_names_the_fix(dirs):
    conf_dir, bin_dir = dirs
    with pytest.raises(EnvironmentMissing, match="k3s"):
        install.install(conf_dir, bin_dir, BLOCK)


def test_foreign_executable_is_not_overwritten(dirs):
    conf_dir, bin_dir = dirs
    write(os.path.join(conf_dir, "10-net.conflist"), FLANNEL)
    os.makedirs(bin_dir)
    foreign = os.path.join(bin_dir, "meshintercept-cni")
    write(foreign, "#!/bin/sh\necho someone else\n")
    with pytest.raises(UsageError, match="--force"):
        install.install(conf_dir, bin_dir, BLOCK)
    assert read(os.path.join(conf_dir, "10-net.conflist")) == FLANNEL
    install.uninstall(conf_dir, bin_dir)
    assert os.path.exists(foreign)  # uninstall only removes what we wrote


def test_local_shim_runs_the_plugin(dirs, tmp_path):
    conf_dir, bin_dir = dirs
    write(os.path.join(conf_dir, "10-net.conflist"), FLANNEL)
    install.install(conf_dir, bin_dir, BLOCK, python=sys.executable)
    shim = os.path.join(bin_dir, "meshintercept-cni")
    assert os.stat(shim).st_mode & 0o111
    proc = subprocess.run([shim], input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin",
                               "MESHINTERCEPT_CNI_LOG_FILE": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


def test_agent_shim_without_agent(dirs, tmp_path):
    """With the node agent down: ADD asks to try again later (pods wait instead of starting
    unintercepted), DEL succeeds (nothing of ours can be live)."""
    pidfile = tmp_path / "agent.pid"
    text = install.shim_text("agent", python="/opt/meshintercept/venv/bin/python", pidfile=str(pidfile))
    shim = tmp_path / "shim"
    shim.write_text(text)
    shim.chmod(0o755)
    base = {"PATH": "/usr/bin:/bin", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"}
    for pid_text in (None, "999999999", str(os.getpid())):  # no file, dead pid, a pid without the agent's python
        if pid_text is not None:
            pidfile.write_text(pid_text)
        add = subprocess.run([str(shim)], input=b'{"cniVersion":"1.0.0"}', capture_output=True, env={**base, "CNI_COMMAND": "ADD"})
        assert add.returncode == 1 and json.loads(add.stdout)["code"] == 11
        delete = subprocess.run([str(shim)], input=b"{}", capture_output=True, env={**base, "CNI_COMMAND": "DEL"})
        assert delete.returncode == 0 and delete.stdout == b""
        version = subprocess.run([str(shim)], input=b"{}", capture_output=True, env={**base, "CNI_COMMAND": "VERSION"})
        assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]


@pytest.mark.root
@pytest.mark.parametrize("python", ["host's", "agent's own"])
def test_agent_shim_enters_the_agent_mount_namespace(dirs, tmp_path, python):
    """The shim runs the plugin inside the mount namespace of the process named in the pid
    file. Here the 'agent' is a process in a private mount namespace where a tmpfs hides a
    marker file the host can see: the plugin's log, written inside, proves where it ran.
    "agent's own": the interpreter is a symlink to an absolute path that exists only in the
    agent's view, as a venv's python is on a host without Python."""
    inside = tmp_path / "agent-view"
    inside.mkdir()
    interpreter = sys.executable
    setup = f"mount -t tmpfs none {inside}"
    if python == "agent's own":
        interpreter = f"{inside}/venv-python"
        setup += (f" && printf '#!/bin/sh\\nexec {sys.executable} \"$@\"\\n' > {inside}/python3"
                  f" && chmod +x {inside}/python3 && ln -s {inside}/python3 {interpreter}")
    agent = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f"{setup} && touch {inside}/ready && exec sleep 60"])
    try:
        for _ in range(200):
            if os.path.exists(f"/proc/{agent.pid}/root{inside}/ready"):
                break
            subprocess.run(["sleep", "0.02"])
        pidfile = tmp_path / "agent.pid"
        pidfile.write_text(str(agent.pid))
        shim = tmp_path / "shim"
        shim.write_text(install.shim_text("agent", python=interpreter, pidfile=str(pidfile)))
        shim.chmod(0o755)
        log = f"{inside}/plugin.log"
        proc = subprocess.run([str(shim)], input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                              env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION", "MESHINTERCEPT_CNI_LOG_FILE": log})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
        assert not os.path.exists(log)  # not in the host's view...
        with open(f"/proc/{agent.pid}/root{log}") as f:  # ...but in the agent's
            assert json.loads(f.readline())["command"] == "VERSION"
    finally:
        agent.kill()
        agent.wait()


def test_kubeconfig_from_serviceaccount(dirs, tmp_path, monkeypatch):
    conf_dir, bin_dir = dirs
    write(os.path.join(conf_dir, "10-net.conflist"), FLANNEL)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok-123\n")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    result = install.install(conf_dir, bin_dir, {"pod_selection": "opt-in"}, kubeconfig_from_serviceaccount=True,
                             sa_dir=str(sa))
    path = os.path.join(conf_dir, install.KUBECONFIG_NAME)
    assert result["plugin"]["kubeconfig"] == path
    assert os.stat(path).st_mode & 0o777 == 0o600
    from meshintercept.cni.kube import load_kubeconfig

    endpoint = load_kubeconfig(path)
    assert endpoint.server == "https://10.96.0.1:443" and endpoint.token == "tok-123"
    assert b"BEGIN CERTIFICATE" in endpoint.ca_data
    assert not install.install(conf_dir, bin_dir, {"pod_selection": "opt-in"}, kubeconfig_from_serviceaccount=True,
                               sa_dir=str(sa))["changed"]
    install.uninstall(conf_dir, bin_dir)
    assert os.listdir(conf_dir) == ["10-net.conflist"] and read(os.path.join(conf_dir, "10-net.conflist")) == FLANNEL


def test_cli_install_status_uninstall(dirs):
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    write(path, FLANNEL)
    runner = CliRunner()
    args = ["--conf-dir", conf_dir, "--bin-dir", bin_dir]
    res = runner.invoke(cni, ["install", *args, "--plugin-conf", json.dumps(BLOCK), "--mode", "iptables"])
    assert res.exit_code == 0, res.output
    assert f"updated {path}" in res.output
    res = runner.invoke(cni, ["install", *args, "--plugin-conf", json.dumps(BLOCK)])
    assert "nothing changed" in res.output
    res = runner.invoke(cni, ["status", *args, "--json"])
    data = json.loads(res.output)
    assert data["installed"] and data["shim"] == os.path.join(bin_dir, "meshintercept-cni")
    res = runner.invoke(cni, ["uninstall", *args])
    assert res.exit_code == 0 and read(path) == FLANNEL


def test_wired_into_the_meshintercept_command(dirs):
    """Through the real console script: the 'cni' group comes from the entry point, and a
    bad block is one clear error line with the usage exit code."""
    conf_dir, bin_dir = dirs
    path = os.path.join(conf_dir, "10-net.conflist")
    write(path, FLANNEL)
    exe = os.path.join(os.path.dirname(sys.executable), "meshintercept")
    ok = subprocess.run([exe, "cni", "install", "--conf-dir", conf_dir, "--bin-dir", bin_dir], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([exe, "cni", "install", "--conf-dir", conf_dir, "--bin-dir", bin_dir,
                          "--plugin-conf", '{"inbound_port": 15001}'], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "meshintercept: error: plugin config rejected: inbound and outbound port are both 15001; "
        "the sidecar needs two different ports."]
    subprocess.run([exe, "cni", "uninstall", "--conf-dir", conf_dir, "--bin-dir", bin_dir], check=True, capture_output=True)
    assert read(path) == FLANNEL
