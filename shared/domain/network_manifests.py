"""The NetworkPolicy that lets the VMs of one environment, and only they, reach each other.

The environments' namespace denies all traffic by default (``default-deny-all`` in
``deploy/base/network-policies-envs.yaml``). A NetworkPolicy cannot say "pods with the same
environment label as me", so each multi-VM environment gets its own policy with the label's
value written in (docs/DEPLOY.md, "The per-environment policy";
``deploy/examples/environment-network-policy.yaml`` is one such object). This module builds it
from the metadata and member labels ``shared.domain.manifests`` chooses, knowing nothing else
of labvirt.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from shared.domain.kube_names import require_label_key, require_label_value

Manifest = dict[str, Any]

NETWORK_POLICY_API_VERSION: Final = "networking.k8s.io/v1"
NETWORK_POLICY_KIND: Final = "NetworkPolicy"


def build_peer_network_policy(
    *, metadata: Mapping[str, Any], members: Mapping[str, str]
) -> Manifest:
    """A NetworkPolicy letting the pods that match ``members`` reach each other, any port.

    The policy selects those pods and allows traffic in from and out to the same selector,
    nothing more: what else they may reach is up to the namespace's other policies. No ports,
    so every protocol passes (kubeadm, the CNI inside the VMs, ssh). ``members`` must not be
    empty: an empty selector would open every pod of the namespace to every other.
    """
    if not members:
        raise ValueError("a peer policy needs member labels; an empty selector selects every pod")
    for key, value in members.items():
        require_label_key(key)
        require_label_value(value, what=f"value of member label {key!r}")

    def selector() -> Manifest:
        return {"matchLabels": dict(members)}

    return {
        "apiVersion": NETWORK_POLICY_API_VERSION,
        "kind": NETWORK_POLICY_KIND,
        "metadata": copy.deepcopy(dict(metadata)),
        "spec": {
            "podSelector": selector(),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": selector()}]}],
            "egress": [{"to": [{"podSelector": selector()}]}],
        },
    }
