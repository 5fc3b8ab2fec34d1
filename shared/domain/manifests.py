"""Pure builders for the Kubernetes objects that make up one learner environment.

Every object carries labels (and a few annotations) from which labvirt can rebuild its state out
of the cluster alone, so a restarted provisioner or reconciler needs no memory of what it made.
The VMIs are ephemeral on purpose: a containerDisk and cloud-init, no PVC, no DataVolume.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from shared.domain.kube_names import (
    is_dns1123_subdomain,
    require_dns1123_label,
    require_label_key,
    require_label_value,
)
from shared.domain.network_manifests import build_peer_network_policy
from shared.domain.templates import (
    MAX_VM_NAME_LENGTH,
    Template,
    VmSpec,
    is_dns1123_label,
)
from shared.domain.user_data import render_user_data

Manifest = dict[str, Any]

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "labvirt"
ENVIRONMENT_LABEL: Final = "labvirt.io/environment"
TEMPLATE_LABEL: Final = "labvirt.io/template"
SESSION_LABEL: Final = "labvirt.io/session"
VM_LABEL: Final = "labvirt.io/vm"
# On the objects of a warm pool's environment: the template whose pool holds it. Passed as an
# extra label (not one of LABVIRT_LABELS) so the builders stay unaware of pools.
POOL_LABEL: Final = "labvirt.io/pool"
LABVIRT_LABELS: Final = frozenset(
    {MANAGED_BY_LABEL, ENVIRONMENT_LABEL, TEMPLATE_LABEL, SESSION_LABEL, VM_LABEL}
)
# Every object labvirt made, and nothing else: what reconcilers list and watch.
MANAGED_BY_SELECTOR: Final = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"

# When labvirt asked for the environment (RFC 3339, UTC); the server's creationTimestamp is per
# object and says nothing about the environment as a whole.
CREATED_AT_ANNOTATION: Final = "labvirt.io/created-at"
# How many VMIs the environment should have, so an incomplete one is visible from the cluster.
VM_COUNT_ANNOTATION: Final = "labvirt.io/vm-count"

VMI_API_VERSION: Final = "kubevirt.io/v1"
VMI_KIND: Final = "VirtualMachineInstance"
NAME_PREFIX: Final = "lv-"
# What is left of a 63-character name once the prefix, a dash and the longest VM name are in.
MAX_ENVIRONMENT_ID_LENGTH: Final = 63 - len(NAME_PREFIX) - 1 - MAX_VM_NAME_LENGTH
DEFAULT_CLUSTER_DOMAIN: Final = "cluster.local"
SSH_PORT: Final = 22
# Disposable VMs have nothing to flush; a quick stop frees capacity for the next learner.
TERMINATION_GRACE_PERIOD_SECONDS: Final = 0

CONTAINER_DISK: Final = "containerdisk"
CLOUD_INIT_DISK: Final = "cloudinitdisk"
POD_NETWORK: Final = "default"

_ENVIRONMENT_ID: Final = re.compile(rf"[a-z0-9]{{1,{MAX_ENVIRONMENT_ID_LENGTH}}}")


@dataclass(frozen=True, kw_only=True)
class EnvironmentManifests:
    """Everything to create for one environment. The Service and the NetworkPolicy only when
    VMs must find and reach each other (multi-VM templates); create the policy first."""

    vmis: tuple[Manifest, ...]
    service: Manifest | None
    network_policy: Manifest | None


def is_valid_environment_id(environment_id: str) -> bool:
    """True for ids that fit in every name and label derived from them (short, [a-z0-9])."""
    return _ENVIRONMENT_ID.fullmatch(environment_id) is not None


def environment_subdomain(environment_id: str) -> str:
    """The VMIs' ``spec.subdomain`` and the name of their headless Service."""
    _require_environment_id(environment_id)
    return f"{NAME_PREFIX}{environment_id}"


def environment_vmi_name(environment_id: str, vm_name: str) -> str:
    """The VMI name of one VM: deterministic, so creating it twice hits 409, not a twin."""
    _require_environment_id(environment_id)
    if not is_dns1123_label(vm_name) or len(vm_name) > MAX_VM_NAME_LENGTH:
        msg = (
            f"VM name must be a DNS-1123 label of at most {MAX_VM_NAME_LENGTH} characters, "
            f"got {vm_name!r}"
        )
        raise ValueError(msg)
    return f"{NAME_PREFIX}{environment_id}-{vm_name}"


def environment_domain(
    environment_id: str, namespace: str, *, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
) -> str:
    """The DNS domain under which ``<hostname>.<domain>`` reaches a VM of a multi-VM environment."""
    require_dns1123_label(namespace, what="namespace")
    if not is_dns1123_subdomain(cluster_domain):
        raise ValueError(f"cluster domain must be a DNS name, got {cluster_domain!r}")
    return f"{environment_subdomain(environment_id)}.{namespace}.svc.{cluster_domain}"


def environment_selector(environment_id: str) -> str:
    """Label selector for every object of one environment (and only labvirt's)."""
    _require_environment_id(environment_id)
    return f"{MANAGED_BY_SELECTOR},{ENVIRONMENT_LABEL}={environment_id}"


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC to the second, the form Kubernetes itself writes timestamps in."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """The inverse of :func:`format_timestamp`, for rebuilding state from annotations."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def build_vmi(
    *,
    template: Template,
    vm: VmSpec,
    environment_id: str,
    namespace: str,
    session_id: str | None,
    environment_token: str,
    extra_labels: Mapping[str, str] | None = None,
    created_at: datetime | None = None,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    extra_annotations: Mapping[str, str] | None = None,
) -> Manifest:
    """The VirtualMachineInstance for one VM of an environment.

    ``extra_annotations`` carry what the caller needs to rebuild its state from the cluster
    (the session's record, see ``shared.domain.recovery``); they cannot replace labvirt's own.
    """
    if vm not in template.vms:
        raise ValueError(f"VM {vm.name!r} is not part of template {template.name!r}")
    labels = _environment_labels(
        template=template, environment_id=environment_id, session_id=session_id
    )
    labels[VM_LABEL] = vm.name
    labels = _merge_extra_labels(labels, extra_labels)
    # Only multi-VM environments get a subdomain, so only they have a domain to resolve in.
    domain = (
        environment_domain(environment_id, namespace, cluster_domain=cluster_domain)
        if template.is_multi_vm
        else None
    )
    require_dns1123_label(namespace, what="namespace")
    spec: Manifest = {
        "domain": {
            "cpu": {"cores": vm.cpu_cores},
            # Requests equal to limits: the VM gets what its template sizes, never more, so
            # one learner's load cannot starve the other VMs on its node.
            "resources": {
                "requests": {"cpu": str(vm.cpu_cores), "memory": vm.memory},
                "limits": {"cpu": str(vm.cpu_cores), "memory": vm.memory},
            },
            "devices": {
                "disks": [
                    {"name": CONTAINER_DISK, "disk": {"bus": "virtio"}},
                    {"name": CLOUD_INIT_DISK, "disk": {"bus": "virtio"}},
                ],
                "interfaces": [{"name": POD_NETWORK, "masquerade": {}}],
            },
        },
        "networks": [{"name": POD_NETWORK, "pod": {}}],
        "volumes": [
            {"name": CONTAINER_DISK, "containerDisk": {"image": vm.image}},
            {
                "name": CLOUD_INIT_DISK,
                "cloudInitNoCloud": {
                    "userData": render_user_data(
                        vm.user_data,
                        environment_token=environment_token,
                        environment_domain=domain,
                    )
                },
            },
        ],
        "hostname": vm.hostname,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_PERIOD_SECONDS,
    }
    if template.is_multi_vm:
        spec["subdomain"] = environment_subdomain(environment_id)
    if vm.readiness_probe is not None:
        spec["readinessProbe"] = copy.deepcopy(vm.readiness_probe)
    return {
        "apiVersion": VMI_API_VERSION,
        "kind": VMI_KIND,
        "metadata": {
            "name": environment_vmi_name(environment_id, vm.name),
            "namespace": namespace,
            "labels": labels,
            "annotations": _environment_annotations(
                template=template, created_at=created_at, extra=extra_annotations
            ),
        },
        "spec": spec,
    }


def build_headless_service(
    *,
    environment_id: str,
    namespace: str,
    template_name: str,
    created_at: datetime | None = None,
) -> Manifest:
    """The headless Service that gives each VMI of an environment a DNS name.

    With ``spec.hostname`` and ``spec.subdomain`` set on the VMIs,
    ``<hostname>.<subdomain>.<namespace>.svc.<cluster domain>`` resolves to the VM.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _environment_object_metadata(
            environment_id=environment_id,
            namespace=namespace,
            template_name=template_name,
            created_at=created_at,
        ),
        "spec": {
            "clusterIP": "None",
            "selector": {ENVIRONMENT_LABEL: environment_id},
            # VMs look each other up while booting, long before their readiness probe passes.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "ssh", "port": SSH_PORT, "targetPort": SSH_PORT, "protocol": "TCP"}],
        },
    }


def build_network_policy(
    *,
    environment_id: str,
    namespace: str,
    template_name: str,
    created_at: datetime | None = None,
) -> Manifest:
    """The NetworkPolicy through which an environment's VMs, and only they, reach each other.

    Named and labelled like the environment's headless Service, so the environment's selector
    finds (and deletes) both; it selects the environment's VMs by labvirt's labels.
    """
    return build_peer_network_policy(
        metadata=_environment_object_metadata(
            environment_id=environment_id,
            namespace=namespace,
            template_name=template_name,
            created_at=created_at,
        ),
        members={MANAGED_BY_LABEL: MANAGED_BY_VALUE, ENVIRONMENT_LABEL: environment_id},
    )


def build_environment(
    *,
    template: Template,
    environment_id: str,
    namespace: str,
    session_id: str | None,
    environment_token: str,
    extra_labels: Mapping[str, str] | None = None,
    created_at: datetime | None = None,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    extra_annotations: Mapping[str, str] | None = None,
) -> EnvironmentManifests:
    """All objects of one environment: a VMI per VM, plus the Service and the NetworkPolicy for
    multi-VM templates (a single VM has no peer to find or reach)."""
    vmis = tuple(
        build_vmi(
            template=template,
            vm=vm,
            environment_id=environment_id,
            namespace=namespace,
            session_id=session_id,
            environment_token=environment_token,
            extra_labels=extra_labels,
            created_at=created_at,
            cluster_domain=cluster_domain,
            extra_annotations=extra_annotations,
        )
        for vm in template.vms
    )
    if not template.is_multi_vm:
        return EnvironmentManifests(vmis=vmis, service=None, network_policy=None)
    shared: dict[str, Any] = {
        "environment_id": environment_id,
        "namespace": namespace,
        "template_name": template.name,
        "created_at": created_at,
    }
    return EnvironmentManifests(
        vmis=vmis,
        service=build_headless_service(**shared),
        network_policy=build_network_policy(**shared),
    )


def _environment_labels(
    *, template: Template, environment_id: str, session_id: str | None
) -> dict[str, str]:
    _require_environment_id(environment_id)
    require_label_value(template.name, what="template name")
    labels = {
        MANAGED_BY_LABEL: MANAGED_BY_VALUE,
        ENVIRONMENT_LABEL: environment_id,
        TEMPLATE_LABEL: template.name,
    }
    if session_id is not None:
        require_label_value(session_id, what="session id")
        labels[SESSION_LABEL] = session_id
    return labels


def _environment_object_metadata(
    *, environment_id: str, namespace: str, template_name: str, created_at: datetime | None
) -> Manifest:
    """The metadata of an environment's per-environment objects (its Service, its policy)."""
    require_dns1123_label(namespace, what="namespace")
    require_label_value(template_name, what="template name")
    metadata: Manifest = {
        "name": environment_subdomain(environment_id),
        "namespace": namespace,
        "labels": {
            MANAGED_BY_LABEL: MANAGED_BY_VALUE,
            ENVIRONMENT_LABEL: environment_id,
            TEMPLATE_LABEL: template_name,
        },
    }
    if created_at is not None:
        metadata["annotations"] = {CREATED_AT_ANNOTATION: format_timestamp(created_at)}
    return metadata


def _environment_annotations(
    *, template: Template, created_at: datetime | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    annotations = {VM_COUNT_ANNOTATION: str(len(template.vms))}
    for key, value in (extra or {}).items():
        if key == VM_COUNT_ANNOTATION or (key == CREATED_AT_ANNOTATION and created_at is not None):
            raise ValueError(f"extra annotation {key!r} would override one labvirt sets")
        require_label_key(key)  # annotation keys follow the label key syntax
        if not isinstance(value, str):
            raise ValueError(f"annotation {key!r} must be a string, got {value!r}")
        annotations[key] = value
    if created_at is not None:
        annotations[CREATED_AT_ANNOTATION] = format_timestamp(created_at)
    return annotations


def _merge_extra_labels(
    labels: dict[str, str], extra_labels: Mapping[str, str] | None
) -> dict[str, str]:
    # labvirt's own labels drive selectors and state rebuilds; a caller must not redefine them.
    for key, value in (extra_labels or {}).items():
        if key in LABVIRT_LABELS:
            raise ValueError(f"extra label {key!r} would override a label labvirt owns")
        require_label_key(key)
        require_label_value(value, what=f"value of label {key!r}")
    return {**labels, **(extra_labels or {})}


def _require_environment_id(environment_id: str) -> None:
    if not is_valid_environment_id(environment_id):
        msg = (
            f"environment id must be 1-{MAX_ENVIRONMENT_ID_LENGTH} lowercase letters and digits, "
            f"got {environment_id!r}"
        )
        raise ValueError(msg)
