"""The provisioner's wiring: its services, built once per worker process, and its informers.

``wire`` is called by the worker's wiring function (``labvirt.celery_process``) before the
worker takes tasks: it builds the provisioner and the pool environments once, and starts one
informer per region, which reports every change of labvirt's VMIs to one observer, and the
region heartbeat that marks in Redis the regions whose informer is healthy (a region none marks
is down: new sessions go elsewhere). Tasks find the services with
``provisioner_of``/``pool_environments_of``.
"""

from __future__ import annotations

from celery import Celery

from services.provisioner.environments import Provisioner
from services.provisioner.observer import EnvironmentObserver
from services.provisioner.pool_environments import PoolEnvironments
from shared.adapters.informer import VmiInformer
from shared.adapters.region_state import RedisRegionState, RegionHeartbeat
from shared.runtime import Runtime, runtime_of


def _provisioner(runtime: Runtime) -> Provisioner:
    return Provisioner(
        life=runtime.life, templates=runtime.templates, cluster_for=runtime.kube().get
    )


def _pool_environments(runtime: Runtime) -> PoolEnvironments:
    if runtime.pools is None:
        raise RuntimeError("this worker runs without a pool store")
    return PoolEnvironments(
        pools=runtime.pools,
        life=runtime.life,
        queue=runtime.queue,
        templates=runtime.templates,
        cluster_for=runtime.kube().get,
        clock=runtime.clock,
    )


def provisioner_of(app: Celery) -> Provisioner:
    return runtime_of(app).service(Provisioner, _provisioner)


def pool_environments_of(app: Celery) -> PoolEnvironments:
    return runtime_of(app).service(PoolEnvironments, _pool_environments)


def wire(runtime: Runtime, *, follow_sessions: bool, follow_pools: bool) -> list[VmiInformer]:
    """Build the provisioner's services and start one informer per region.

    ``follow_sessions``: this worker takes provisioning work, so it marks sessions ready or
    failed; ``follow_pools``: it takes prewarming, so it marks pooled environments ready.
    """
    runtime.service(Provisioner, _provisioner)
    pools = runtime.service(PoolEnvironments, _pool_environments) if runtime.pools else None
    if not (follow_sessions or follow_pools):
        return []
    observer = EnvironmentObserver(
        life=runtime.life,
        templates=runtime.templates,
        pools=pools if follow_pools else None,
        follow_sessions=follow_sessions,
    )
    informers = [
        VmiInformer(runtime.kube().get(region), observer) for region in runtime.settings.regions
    ]
    for informer in informers:
        informer.start()
    # Ends by itself once every informer is stopped (the worker's shutdown stops them).
    RegionHeartbeat(
        RedisRegionState(runtime.redis),
        informers,
        interval=runtime.settings.region_heartbeat_seconds,
    ).start()
    return informers
