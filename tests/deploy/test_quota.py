"""The VMs' namespace is sized for the shipped templates, with the VMI count binding first."""

from __future__ import annotations

import pytest

from shared.adapters.template_files import load_templates
from shared.domain.templates import quantity_to_bytes
from tests.deploy.kustomize import ENVIRONMENTS_NAMESPACE, cpu, find, memory

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

# What KubeVirt adds to a VM's memory on its virt-launcher pod (QEMU, libvirt, page tables);
# a generous estimate for the shipped 2-vCPU VMs (docs/DEPLOY.md, "Sizing").
LAUNCHER_OVERHEAD = 400 * 2**20


def biggest_vm() -> tuple[float, int]:
    vms = [vm for template in load_templates(None).values() for vm in template.vms]
    return (
        max(vm.cpu_cores for vm in vms),
        max(quantity_to_bytes(vm.memory) for vm in vms) + LAUNCHER_OVERHEAD,
    )


def test_quota_counts_vms_and_backs_the_count_with_cpu_and_memory(built):
    quota = find(built, "ResourceQuota", "labvirt-environments")
    assert quota["metadata"]["namespace"] == ENVIRONMENTS_NAMESPACE
    hard = quota["spec"]["hard"]
    vmis = int(hard["count/virtualmachineinstances.kubevirt.io"])
    cores, vm_memory = biggest_vm()
    largest_environment = max(len(t.vms) for t in load_templates(None).values())
    assert vmis >= largest_environment
    # The count binds before CPU, memory or pods do: a full namespace answers "quota exceeded"
    # at VMI creation, instead of leaving a VMI without a launcher pod until it times out.
    assert cpu(hard["requests.cpu"]) >= vmis * cores
    assert memory(hard["requests.memory"]) >= vmis * vm_memory
    assert int(hard["pods"]) >= vmis
    # One headless Service and one policy per multi-VM environment, plus the fixed policies.
    assert int(hard["services"]) >= vmis // 2
    assert int(hard["count/networkpolicies.networking.k8s.io"]) >= vmis // 2 + 2


def test_limit_range_admits_the_shipped_vms_and_nothing_much_bigger(built):
    limits = find(built, "LimitRange", "labvirt-environments")
    assert limits["metadata"]["namespace"] == ENVIRONMENTS_NAMESPACE
    (container,) = limits["spec"]["limits"]
    assert container["type"] == "Container"
    cores, vm_memory = biggest_vm()
    assert cpu(container["max"]["cpu"]) >= cores
    assert memory(container["max"]["memory"]) >= vm_memory
    assert memory(container["max"]["memory"]) <= 4 * vm_memory
    for resource, parse in (("cpu", cpu), ("memory", memory)):
        request = parse(container["defaultRequest"][resource])
        assert request <= parse(container["default"][resource]) <= parse(container["max"][resource])
        # A container with no limit gets the default one, which must hold a whole VM.
    assert memory(container["default"]["memory"]) >= vm_memory
