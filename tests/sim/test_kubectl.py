"""kubectl, unmodified, against the simulator subprocess."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml

from labvirt.sim.testing import running_simulator, wait_until
from tests.conftest import KUBEVIRT_REFERENCE, require_kubevirt_reference

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
]

EPHEMERAL = KUBEVIRT_REFERENCE / "examples/vmi-ephemeral.yaml"

VMI_YAML = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: {name}
  labels:
    app: {app}
spec:
  domain:
    devices:
      disks:
      - name: containerdisk
        disk: {{bus: virtio}}
      interfaces:
      - name: default
        masquerade: {{}}
    resources:
      requests:
        memory: 128Mi
  networks:
  - name: default
    pod: {{}}
  volumes:
  - name: containerdisk
    containerDisk:
      image: quay.io/containerdisks/cirros:latest
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with running_simulator(
        tmp_path_factory.mktemp("sim"), boot_seconds=1, time_scale=0.2, seed=11
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def kubectl(sim, tmp_path_factory):
    env = sim.kubectl_env(cache_dir=tmp_path_factory.mktemp("kube-cache"))

    def run(*args, check=True, stdin=None, timeout=30):
        result = subprocess.run(
            ["kubectl", *args],
            env=env,
            input=stdin,
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    run.env = env
    return run


def apply(kubectl, name, app="demo"):
    return kubectl("apply", "-f", "-", stdin=VMI_YAML.format(name=name, app=app))


def test_api_resources_lists_vmis(kubectl):
    out = kubectl("api-resources").stdout
    (line,) = [entry for entry in out.splitlines() if entry.startswith("virtualmachineinstances")]
    assert line.split()[:4] == ["virtualmachineinstances", "vmi,vmis", "kubevirt.io/v1", "true"]


def test_apply_the_upstream_example_with_validation(kubectl):
    result = kubectl("apply", "-f", str(require_kubevirt_reference(EPHEMERAL)))
    assert "virtualmachineinstance.kubevirt.io/vmi-ephemeral created" in result.stdout
    assert "--validate" not in result.stderr


def test_get_vmi_prints_kubevirt_columns(kubectl):
    apply(kubectl, "columns")
    header, *rows = kubectl("get", "vmi", "columns").stdout.splitlines()
    assert header.split() == ["NAME", "AGE", "PHASE", "IP", "NODENAME", "READY"]
    assert rows[0].split()[0] == "columns"
    wide = kubectl("get", "vmi", "columns", "-o", "wide").stdout.splitlines()[0].split()
    assert wide[-2:] == ["LIVE-MIGRATABLE", "PAUSED"]
    everywhere = kubectl("get", "vmi", "-A").stdout.splitlines()[0].split()
    assert everywhere[:2] == ["NAMESPACE", "NAME"]


def test_label_and_selectors(kubectl):
    apply(kubectl, "sel-a", app="sel")
    apply(kubectl, "sel-b", app="sel")
    kubectl("label", "vmi", "sel-a", "tier=front")
    out = kubectl("get", "vmi", "-l", "tier=front", "-o", "name").stdout.split()
    assert out == ["virtualmachineinstance.kubevirt.io/sel-a"]
    out = kubectl("get", "vmi", "-l", "app=sel,tier!=front", "-o", "name").stdout.split()
    assert out == ["virtualmachineinstance.kubevirt.io/sel-b"]
    out = kubectl("get", "vmi", "--field-selector", "metadata.name=sel-b", "-o", "name").stdout
    assert out.split() == ["virtualmachineinstance.kubevirt.io/sel-b"]
    bad = kubectl("get", "vmi", "--field-selector", "status.phase=Running", check=False)
    assert bad.returncode != 0
    assert "field label not supported: status.phase" in bad.stderr


def test_replace_with_a_stale_resource_version_conflicts(kubectl, tmp_path):
    apply(kubectl, "stale")
    manifest = tmp_path / "stale.yaml"
    manifest.write_text(kubectl("get", "vmi", "stale", "-o", "yaml").stdout)
    kubectl("label", "vmi", "stale", "changed=yes")
    result = kubectl("replace", "-f", str(manifest), check=False)
    assert result.returncode != 0
    assert "Conflict" in result.stderr
    assert "the object has been modified" in result.stderr
    doc = yaml.safe_load(manifest.read_text())
    doc["metadata"].pop("resourceVersion")
    doc["metadata"]["labels"]["replaced"] = "yes"
    manifest.write_text(yaml.safe_dump(doc))
    kubectl("replace", "-f", str(manifest))  # kubectl fills in the current version itself


def test_get_watch_streams(sim, kubectl):
    streams = sim.stats()["watchStreams"]
    process = subprocess.Popen(
        ["kubectl", "get", "vmi", "-w", "-l", "app=watched", "--request-timeout=20s"],
        env=kubectl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: sim.stats()["watchStreams"] > streams)  # kubectl is watching
        apply(kubectl, "watched", app="watched")
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.split())
            if any(cells[2:3] == ["Running"] for cells in lines[1:]):
                break
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert lines[0][:3] == ["NAME", "AGE", "PHASE"] or lines[0][0] == "watched"
    assert any(cells[0] == "watched" and "Running" in cells for cells in lines)


def test_delete_returns(kubectl):
    apply(kubectl, "deleted")
    result = kubectl("delete", "vmi", "deleted")
    assert 'virtualmachineinstance.kubevirt.io "deleted" deleted' in result.stdout
    gone = kubectl("get", "vmi", "deleted", check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr


def test_wait_for_ready(kubectl):
    apply(kubectl, "ready")
    result = kubectl("wait", "--for=condition=Ready", "vmi/ready", "--timeout=20s")
    assert "condition met" in result.stdout
    phase = kubectl("get", "vmi", "ready", "-o", "jsonpath={.status.phase}").stdout
    assert phase == "Running"


def test_a_vmi_without_memory_is_rejected(kubectl):
    doc = yaml.safe_load(VMI_YAML.format(name="no-memory", app="x"))
    del doc["spec"]["domain"]["resources"]
    result = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0
    assert "no memory requested" in result.stderr


def test_services_and_network_policies(kubectl):
    # Not `kubectl create service`: its typed client sends protobuf, which we answer with 415.
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
            }
        ),
    )
    out = kubectl("get", "svc", "web").stdout.splitlines()
    assert out[0].split()[:5] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    assert out[1].split()[1] == "ClusterIP"
    assert out[1].split()[4] == "80/TCP"
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "isolate"},
                "spec": {"podSelector": {"matchLabels": {"env": "e1"}}},
            }
        ),
    )
    assert kubectl("get", "netpol", "isolate").stdout.splitlines()[1].split()[1] == "env=e1"
    kubectl("delete", "svc", "web")


def test_kubectl_mostly_works_under_injected_errors(sim, kubectl):
    # client-go retries 429 and 5xx answers that carry Retry-After, so most commands succeed.
    sim.set_faults(error_rate=0.2)
    try:
        results = [kubectl("get", "vmi", check=False).returncode for _ in range(4)]
    finally:
        sim.set_faults(error_rate=0.0)
    assert results.count(0) >= 3
