"""KubeVirt's serial console subresource, driven as the official client's stream module would.

The websocket side mirrors ``kubernetes.stream.ws_client.create_websocket``: ws/wss URL from the
kubeconfig's host, the ``authorization`` header the client's auth settings give, the same
``sslopt``, and subprotocol ``plain.kubevirt.io`` with binary frames of raw terminal bytes.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error

import pytest
import websocket
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.stream.ws_client import get_websocket_url

from labvirt.sim.console import PROTOCOL, SUBRESOURCE_GROUP
from labvirt.sim.shell import MAX_LINE_BYTES, Peer, Shell
from labvirt.sim.testing import running_simulator_in_thread, wait_until

NS = "default"
VMIS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
ENV_LABEL = "labvirt.io/environment"


def vmi_body(name, *, env=None, hostname=None, subdomain=None, memory="64Mi"):
    spec = {
        "domain": {
            "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}]},
            "resources": {"requests": {"memory": memory}},
        },
        "volumes": [{"name": "containerdisk", "containerDisk": {"image": "quay.io/cirros"}}],
    }
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    labels = {ENV_LABEL: env} if env else {}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }


def create(sim, name, **options):
    return sim.request("POST", VMIS, vmi_body(name, **options))


def wait_running(sim, *names):
    def running():
        objs = [sim.request("GET", f"{VMIS}/{n}") for n in names]
        return all(o.get("status", {}).get("phase") == "Running" for o in objs) and objs

    return wait_until(running, timeout=15)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("console"), boot_seconds=1, time_scale=0.1, seed=3
    ) as handle:
        create(handle, "solo")
        create(handle, "lab-a-cp", env="lab-a", hostname="controlplane", subdomain="lab-a")
        create(handle, "lab-a-node", env="lab-a", hostname="node01", subdomain="lab-a")
        # Another environment in the same namespace, with a clashing and a unique hostname.
        create(handle, "lab-b-node", env="lab-b", hostname="node01", subdomain="lab-b")
        create(handle, "lab-b-other", env="lab-b", hostname="outsider", subdomain="lab-b")
        wait_running(handle, "solo", "lab-a-cp", "lab-a-node", "lab-b-node", "lab-b-other")
        yield handle


class Console:
    """One console connection; reads frames until the text it waits for shows up."""

    def __init__(self, ws):
        self.ws = ws
        self.pending = b""

    def send(self, text):
        self.ws.send(text.encode(), opcode=websocket.ABNF.OPCODE_BINARY)

    def expect(self, marker, timeout=5.0):
        """Everything up to and including ``marker``, as text."""
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.pending:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.pending!r}"
            opcode, data = self.ws.recv_data(control_frame=True)
            assert opcode != websocket.ABNF.OPCODE_CLOSE, f"closed while waiting for {marker!r}"
            if opcode == websocket.ABNF.OPCODE_BINARY:
                self.pending += data
            else:
                assert opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG)
        end = self.pending.index(marker.encode()) + len(marker)
        text, self.pending = self.pending[:end].decode(), self.pending[end:]
        return text

    def run(self, command, prompt):
        """The command's output (the echo and the next prompt cut off)."""
        self.send(command + "\r")
        out = self.expect(prompt)
        assert out.startswith(command + "\r\n")
        return out[len(command) + 2 : -len(prompt)]

    def closed(self, timeout=5.0):
        """Read until the server's close frame; its code and reason."""
        self.ws.settimeout(timeout)
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big"), data[2:].decode()


def connect(sim, name, namespace=NS, version="v1"):
    """What ``kubernetes.stream``'s ``create_websocket`` does, with KubeVirt's subprotocol."""
    conf = client.Configuration()
    config.load_kube_config(config_file=str(sim.kubeconfig_path), client_configuration=conf)
    path = (
        f"/apis/{SUBRESOURCE_GROUP}/{version}/namespaces/{namespace}"
        f"/virtualmachineinstances/{name}/console"
    )
    url = get_websocket_url(conf.host + path)
    assert url.startswith(("ws://", "wss://"))
    header = [
        f"{auth['key']}: {auth['value']}"
        for auth in conf.auth_settings().values()
        if auth["in"] == "header" and auth["value"]
    ]
    assert any(h.startswith("authorization: Bearer ") for h in header)
    if url.startswith("wss://") and conf.verify_ssl:
        sslopt = {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": conf.ssl_ca_cert}
    else:
        sslopt = {"cert_reqs": ssl.CERT_NONE}
    ws = websocket.WebSocket(sslopt=sslopt, skip_utf8_validation=False)
    ws.connect(url, header=header, subprotocols=[PROTOCOL], timeout=5)
    assert ws.subprotocol == PROTOCOL
    return Console(ws)


def refused(sim, name):
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        connect(sim, name)
    return caught.value.status_code, json.loads(caught.value.resp_body)


# -- discovery --------------------------------------------------------------------------------


def test_discovery_lists_the_console_subresource(sim):
    groups = {g["name"]: g for g in sim.request("GET", "/apis")["groups"]}
    group = groups[SUBRESOURCE_GROUP]
    assert group["preferredVersion"]["groupVersion"] == f"{SUBRESOURCE_GROUP}/v1"
    assert "v1" in [v["version"] for v in group["versions"]]
    listing = sim.request("GET", f"/apis/{SUBRESOURCE_GROUP}/v1")
    assert listing["kind"] == "APIResourceList"
    assert listing["groupVersion"] == f"{SUBRESOURCE_GROUP}/v1"
    (console,) = [r for r in listing["resources"] if r["name"].endswith("/console")]
    assert console["name"] == "virtualmachineinstances/console"
    assert console["namespaced"] is True
    assert sim.request("GET", f"/apis/{SUBRESOURCE_GROUP}")["kind"] == "APIGroup"
    # The official client's discovery walks every group, the subresources included.
    with sim.api_client() as api_client:
        vmis = DynamicClient(api_client).resources.get(
            api_version="kubevirt.io/v1", kind="VirtualMachineInstance"
        )
        assert vmis.namespaced


# -- the shell --------------------------------------------------------------------------------


def test_prompt_hostname_and_commands(sim):
    console = connect(sim, "solo")
    prompt = "learner@solo:~$ "
    assert console.expect(prompt) == prompt
    assert console.run("hostname", prompt) == "solo\r\n"
    assert console.run("whoami", prompt) == "learner\r\n"
    assert console.run("echo hello   'big world'", prompt) == "hello big world\r\n"
    assert console.run("uname -a", prompt).startswith("Linux solo 6.8.0")
    assert 'VERSION_ID="24.04"\r\n' in console.run("cat /etc/os-release", prompt)
    assert console.run("frobnicate --now", prompt) == "frobnicate: command not found\r\n"
    assert console.run("", prompt) == ""
    console.ws.close()


def test_spec_hostname_names_the_prompt(sim):
    console = connect(sim, "lab-a-cp")
    prompt = "learner@controlplane:~$ "
    console.expect(prompt)
    assert console.run("hostname", prompt) == "controlplane\r\n"
    console.ws.close()


def test_typing_is_echoed_like_a_tty(sim):
    console = connect(sim, "solo")
    prompt = "learner@solo:~$ "
    console.expect(prompt)
    console.send("whoamx\x7fi")
    assert console.expect("i") == "whoamx\b \bi"
    console.send("\r")
    assert console.expect(prompt) == "\r\nlearner\r\n" + prompt
    console.send("sleep 100\x03")
    assert console.expect(prompt) == "sleep 100^C\r\n" + prompt
    console.ws.close()


def test_ping_reaches_only_the_same_environment(sim):
    console = connect(sim, "lab-a-cp")
    prompt = "learner@controlplane:~$ "
    console.expect(prompt)
    peer = sim.request("GET", f"{VMIS}/lab-a-node")
    address = peer["status"]["interfaces"][0]["ipAddress"]
    fqdn = f"node01.lab-a.{NS}.svc.cluster.local"
    for command in ("ping -c1 node01", "ping -c 1 node01.lab-a", f"ping -c1 {fqdn}"):
        out = console.run(command, prompt)
        assert f"64 bytes from {fqdn} ({address}): icmp_seq=1" in out, command
        assert "1 packets transmitted, 1 received, 0% packet loss" in out
    for name in ("outsider", f"outsider.lab-b.{NS}.svc.cluster.local", "node01.lab-b", "nowhere"):
        out = console.run(f"ping -c1 {name}", prompt)
        assert out == f"ping: {name}: Name or service not known\r\n"
    console.ws.close()


# -- one console per VMI ----------------------------------------------------------------------


def test_a_new_connection_takes_over(sim):
    prompt = "learner@node01:~$ "
    first = connect(sim, "lab-a-node")
    first.expect(prompt)
    first.send("ech")
    first.expect("ech")
    second = connect(sim, "lab-a-node")
    code, reason = first.closed()
    assert code == 1000
    assert "another" in reason
    # The shell belongs to the VMI: the half-typed line is still there.
    assert second.expect(prompt + "ech") == prompt + "ech"
    second.send("o still here\r")
    assert second.expect(prompt) == "o still here\r\nstill here\r\n" + prompt
    wait_until(lambda: sim.stats()["consoleConnections"] == 1)
    second.ws.close()
    wait_until(lambda: sim.stats()["consoleConnections"] == 0)


# -- refusals and endings ---------------------------------------------------------------------


def test_missing_vmi_is_404(sim):
    status, body = refused(sim, "ghost")
    assert status == 404
    assert body["kind"] == "Status"
    assert body["reason"] == "NotFound"
    assert body["message"] == 'virtualmachineinstance.kubevirt.io "ghost" not found'


def test_vmi_not_running_is_409(sim):
    create(sim, "too-big", memory="1Ti")  # fits on no node: it stays Scheduling
    wait_until(lambda: sim.request("GET", f"{VMIS}/too-big")["status"]["phase"] == "Scheduling")
    status, body = refused(sim, "too-big")
    assert status == 409
    assert body["reason"] == "Conflict"
    assert "VMI is not running" in body["message"]
    sim.request("DELETE", f"{VMIS}/too-big")


def test_plain_get_without_upgrade_is_400(sim):
    with pytest.raises(urllib.error.HTTPError) as caught:
        sim.request(
            "GET",
            f"/apis/{SUBRESOURCE_GROUP}/v1/namespaces/{NS}/virtualmachineinstances/solo/console",
        )
    assert caught.value.code == 400


def test_deleting_the_vmi_closes_its_console(sim):
    create(sim, "doomed")
    wait_running(sim, "doomed")
    console = connect(sim, "doomed")
    console.expect("learner@doomed:~$ ")
    sim.request("DELETE", f"{VMIS}/doomed")
    code, reason = console.closed()
    assert code == 1000
    assert reason in ("the VMI is no longer running", "the VMI was deleted")
    wait_until(lambda: sim.stats()["consoleConnections"] == 0)


def test_a_crash_closes_the_console(sim):
    create(sim, "fragile")
    wait_running(sim, "fragile")
    console = connect(sim, "fragile", version="v1alpha3")
    console.expect("learner@fragile:~$ ")
    sim.crash(NS, "fragile")
    assert console.closed() == (1000, "the VMI is no longer running")
    status, body = refused(sim, "fragile")
    assert (status, body["reason"]) == (409, "Conflict")


# -- the line discipline, without a network -----------------------------------------------------


def test_shell_bounds_and_ignores_what_a_prompt_ignores():
    shell = Shell("vm", lambda _: None)
    assert shell.feed(b"\x1b[A\x1b[D\x04") == b""  # arrow keys and ^D: nothing
    out = shell.feed(b"x" * (MAX_LINE_BYTES + 3))
    assert out == b"x" * MAX_LINE_BYTES + b"\x07" * 3
    assert shell.feed(b"\x03").startswith(b"^C\r\n")
    assert shell.feed(b"h\xc3\xa9\x7f\x7f") == b"h\xc3\xa9\b \b\b \b"  # one erase per character
    assert shell.feed(b"\x7f") == b""  # nothing left to erase
    assert shell.feed(b"\r\n") == b"\r\n" + shell.prompt  # CR LF ends one line
    assert shell.feed(b"\n\n").count(shell.prompt) == 2


def test_shell_ping_arguments():
    shell = Shell("vm", lambda name: Peer(f"{name}.x", "10.0.0.9") if name == "peer" else None)

    def run(line):
        out = shell.feed(line.encode() + b"\r").decode()
        return out[len(line) + 2 : -len(shell.prompt)]

    assert "4 packets transmitted, 4 received" in run("ping peer")
    assert "2 packets transmitted, 2 received" in run("ping -c 2 peer")
    assert run("ping") == "ping: usage error: Destination address required\r\n"
    assert run("ping -c0 peer").startswith("ping: invalid argument: '0'")
    assert run("ping -c") == "ping: option requires an argument -- 'c'\r\n"
    assert run("cat /etc/shadow") == "cat: /etc/shadow: No such file or directory\r\n"
    assert run("echo 'unterminated") == "-bash: syntax error: unexpected end of file\r\n"
