"""The API and the gateway believe X-Forwarded-For from the pod range only: the ingress
controller's, which the overlay's cluster-network.yaml names."""

from __future__ import annotations

import pytest
import yaml

from shared.config import Settings
from tests.deploy.kustomize import COMPONENTS, KUSTOMIZATIONS, build_overlay, find

pytestmark = pytest.mark.kubectl

CLUSTER_NETWORK = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: labvirt-cluster-network
  annotations:
    config.kubernetes.io/local-config: "true"
data:
  pod-cidr: 172.30.0.0/16
  service-cidr: 10.96.0.0/12
  apiserver-cidr: 10.96.0.1/32
"""


def test_the_overlays_pod_range_is_the_trusted_proxies(tmp_path) -> None:
    objects = build_overlay(
        tmp_path,
        resources=[KUSTOMIZATIONS["base"]],
        components=[COMPONENTS["cluster-network"]],
        files={"cluster-network.yaml": CLUSTER_NETWORK},
    )
    config = find(objects, "ConfigMap", "labvirt")["data"]
    assert config["LABVIRT_TRUSTED_PROXIES"] == "172.30.0.0/16"


def test_the_shipped_value_reads_as_a_network(builds) -> None:
    config = find(builds["production"], "ConfigMap", "labvirt")["data"]
    overlay_network = KUSTOMIZATIONS["production"] / "cluster-network.yaml"
    pod_cidr = yaml.safe_load(overlay_network.read_text())["data"]["pod-cidr"]
    settings = Settings.from_env({**config, "LABVIRT_MODE": "dev"})
    assert [str(n) for n in settings.limits.trusted_proxies] == [pod_cidr]
