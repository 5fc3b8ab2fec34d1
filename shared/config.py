"""labvirt's configuration: one frozen, typed object built from the environment in one place.

Every process (API, worker, beat, dev) calls ``Settings.from_env()`` once at start-up and
passes the result down; nothing else reads ``os.environ``. A bad value fails at once with a
message naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from shared.adapters.redis_client import RedisUrlError, sentinel_target
from shared.cluster_config import (
    Cluster,
    ClusterConfigError,
    clusters_from_file,
    clusters_from_spec,
)
from shared.config_env import ConfigError, EnvReader
from shared.config_limits import Limits, limits_from_env

SOURCE_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["Cluster", "ConfigError", "Limits", "Mode", "Settings"]


class Mode(StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: those it may run on (its affinity: a container's
    cpuset), at most its cgroup's CPU quota rounded up (a pod's CPU limit)."""
    has_affinity = hasattr(os, "sched_getaffinity")
    affinity = len(os.sched_getaffinity(0)) if has_affinity else os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return affinity if quota is None else max(1, min(affinity, math.ceil(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """The cgroup's CPU limit in CPUs (cgroup v2's ``cpu.max``, else v1's CFS quota); None
    when there is none, or no cgroup to read (not Linux)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except FileNotFoundError:
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except FileNotFoundError:
            return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)


@dataclass(frozen=True)
class Settings:
    mode: Mode = Mode.PRODUCTION
    redis_url: str = "redis://127.0.0.1:6379/0"
    clusters: tuple[Cluster, ...] = ()
    default_region: str = "local"
    api_host: str = "0.0.0.0"  # noqa: S104 - a server in a pod listens on every interface  # nosec B104
    api_port: int = 8080
    # gunicorn worker processes (default: the CPUs this process may run on) and threads in each.
    api_workers: int = field(default_factory=available_cpus)
    api_threads: int = 32
    # The gateway: event streams, terminals and the learner page, on an asyncio loop.
    gateway_host: str = "0.0.0.0"  # noqa: S104 - a server in a pod listens on every interface  # nosec B104
    gateway_port: int = 8081
    # Set: the gateway also proxies every other path to this API (one origin, `labvirt dev`).
    gateway_api_url: str | None = None
    # A session whose every connection closed, and none came back within this, is closed.
    disconnect_grace_seconds: float = 30.0
    # A task's time limit, and how long a dead worker's task waits before another takes it.
    task_time_limit_seconds: float = 120.0
    visibility_timeout_seconds: float = 300.0
    # Tasks that failed for good: how long their records stay, and how many at most.
    dead_letter_retention_seconds: float = 7 * 24 * 3600.0
    dead_letter_max: int = 10_000
    # How long an ended or failed session's document, events and claimed environment stay.
    ended_retention_seconds: int = 3600
    frontend_tokens: frozenset[str] = field(default_factory=frozenset)
    admin_tokens: frozenset[str] = field(default_factory=frozenset)
    templates_path: Path | None = None
    # The npm packages the browser pages load (xterm.js, swagger-ui): `make install` puts them
    # beside pyproject.toml; a container image sets LABVIRT_NODE_MODULES.
    node_modules: Path = field(default_factory=lambda: SOURCE_ROOT / "node_modules")
    log_format: str = "json"
    log_level: str = "INFO"
    # Threads (the default: tasks wait on the cluster) or processes (a task that crashes or
    # leaks takes only its own process with it); concurrency counts either.
    worker_pool: str = "threads"
    worker_concurrency: int = 16
    kube_pool_maxsize: int = 32
    reaper_interval_seconds: float = 5.0
    reaper_batch: int = 500
    idle_timeout_seconds: int | None = None  # overrides every template's when set
    # Session lifecycle: more per-template overrides, and the reaper's and
    # reconciler's knobs.
    max_lifetime_seconds: int | None = None
    startup_timeout_seconds: int | None = None
    extend_step_seconds: int | None = None
    hard_deadline_seconds: int | None = None
    max_sessions_per_user: int = 1
    expiry_warning_seconds: float = 300.0
    teardown_retry_seconds: float = 300.0
    reconcile_interval_seconds: float = 30.0
    orphan_grace_seconds: float = 120.0
    # A provisioning session whose environment is not created this long after its provision
    # was asked for has it asked again by the reaper (its worker died holding the task).
    provision_recovery_seconds: float = 15.0
    events_keepalive_seconds: float = 15.0
    teardown_timeout_seconds: float = 120.0
    kube_request_timeout_seconds: float = 30.0
    # Warm pools: the prewarmer's tick and the bounds of one pool's changes per tick.
    prewarm_interval_seconds: float = 5.0
    prewarm_batch: int = 10
    prewarm_max_in_flight: int = 20
    pool_max_warm_age_seconds: float = 4 * 3600.0
    # Each worker marks the regions it follows alive this often (for 3x as long).
    region_heartbeat_seconds: float = 5.0
    # How long a create's answer is kept for a replay of its Idempotency-Key.
    idempotency_ttl_seconds: int = 24 * 3600
    limits: Limits = field(default_factory=Limits)
    # Metrics: scrape tokens (admin tokens scrape too), the port workers and beat serve them
    # on (0: none), and where API and worker processes keep their shared metric files.
    metrics_tokens: frozenset[str] = field(default_factory=frozenset)
    metrics_port: int = 9464
    metrics_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = EnvReader(os.environ if environ is None else environ)
        mode = env.choice("LABVIRT_MODE", [m.value for m in Mode], Mode.PRODUCTION.value)
        namespace = env.string("LABVIRT_NAMESPACE", "default")
        default_region = env.string("LABVIRT_DEFAULT_REGION", "local")
        clusters = _clusters(env, default_region=default_region, namespace=namespace)
        settings = cls(
            mode=Mode(mode),
            redis_url=env.string("REDIS_URL", cls.redis_url),
            clusters=clusters,
            default_region=default_region,
            api_host=env.string("LABVIRT_API_HOST", cls.api_host),
            api_port=env.integer("LABVIRT_API_PORT", cls.api_port, minimum=0, maximum=65535),
            api_workers=env.integer("LABVIRT_API_WORKERS", available_cpus(), minimum=1),
            api_threads=env.integer("LABVIRT_API_THREADS", cls.api_threads, minimum=1),
            gateway_host=env.string("LABVIRT_GATEWAY_HOST", cls.gateway_host),
            gateway_port=env.integer(
                "LABVIRT_GATEWAY_PORT", cls.gateway_port, minimum=0, maximum=65535
            ),
            gateway_api_url=env.string("LABVIRT_GATEWAY_API_URL", "") or None,
            disconnect_grace_seconds=env.number(
                "LABVIRT_DISCONNECT_GRACE_SECONDS", cls.disconnect_grace_seconds, minimum=1
            ),
            task_time_limit_seconds=env.number(
                "LABVIRT_TASK_TIME_LIMIT_SECONDS", cls.task_time_limit_seconds, minimum=1
            ),
            visibility_timeout_seconds=env.number(
                "LABVIRT_VISIBILITY_TIMEOUT_SECONDS", cls.visibility_timeout_seconds, minimum=1
            ),
            dead_letter_retention_seconds=env.number(
                "LABVIRT_DEAD_LETTER_RETENTION_SECONDS",
                cls.dead_letter_retention_seconds,
                minimum=60,
            ),
            dead_letter_max=env.integer("LABVIRT_DEAD_LETTER_MAX", cls.dead_letter_max, minimum=1),
            ended_retention_seconds=env.integer(
                "LABVIRT_ENDED_RETENTION_SECONDS", cls.ended_retention_seconds, minimum=60
            ),
            frontend_tokens=env.tokens("LABVIRT_FRONTEND_TOKENS"),
            admin_tokens=env.tokens("LABVIRT_ADMIN_TOKENS"),
            templates_path=env.path("LABVIRT_TEMPLATES"),
            node_modules=env.path("LABVIRT_NODE_MODULES") or SOURCE_ROOT / "node_modules",
            log_format=env.choice(
                "LABVIRT_LOG_FORMAT",
                ["json", "console"],
                "console" if mode == Mode.DEV.value else "json",
            ),
            log_level=env.choice(
                "LABVIRT_LOG_LEVEL", ["DEBUG", "INFO", "WARNING", "ERROR"], "INFO", upper=True
            ),
            worker_pool=env.choice("LABVIRT_WORKER_POOL", ["threads", "prefork"], cls.worker_pool),
            worker_concurrency=env.integer(
                "LABVIRT_WORKER_CONCURRENCY", cls.worker_concurrency, minimum=1
            ),
            kube_pool_maxsize=env.integer(
                "LABVIRT_KUBE_POOL_MAXSIZE", cls.kube_pool_maxsize, minimum=1
            ),
            reaper_interval_seconds=env.number(
                "LABVIRT_REAPER_INTERVAL_SECONDS", cls.reaper_interval_seconds, minimum=0.1
            ),
            reaper_batch=env.integer("LABVIRT_REAPER_BATCH", cls.reaper_batch, minimum=1),
            idle_timeout_seconds=env.optional_integer("LABVIRT_IDLE_TIMEOUT_SECONDS", minimum=1),
            max_lifetime_seconds=env.optional_integer("LABVIRT_MAX_LIFETIME_SECONDS", minimum=1),
            startup_timeout_seconds=env.optional_integer(
                "LABVIRT_STARTUP_TIMEOUT_SECONDS", minimum=1
            ),
            extend_step_seconds=env.optional_integer("LABVIRT_EXTEND_STEP_SECONDS", minimum=0),
            hard_deadline_seconds=env.optional_integer("LABVIRT_HARD_DEADLINE_SECONDS", minimum=1),
            max_sessions_per_user=env.integer(
                "LABVIRT_MAX_SESSIONS_PER_USER", cls.max_sessions_per_user, minimum=1
            ),
            expiry_warning_seconds=env.number(
                "LABVIRT_EXPIRY_WARNING_SECONDS", cls.expiry_warning_seconds, minimum=0
            ),
            teardown_retry_seconds=env.number(
                "LABVIRT_TEARDOWN_RETRY_SECONDS", cls.teardown_retry_seconds, minimum=1
            ),
            reconcile_interval_seconds=env.number(
                "LABVIRT_RECONCILE_INTERVAL_SECONDS", cls.reconcile_interval_seconds, minimum=0.1
            ),
            orphan_grace_seconds=env.number(
                "LABVIRT_ORPHAN_GRACE_SECONDS", cls.orphan_grace_seconds, minimum=0
            ),
            provision_recovery_seconds=env.number(
                "LABVIRT_PROVISION_RECOVERY_SECONDS", cls.provision_recovery_seconds, minimum=1
            ),
            events_keepalive_seconds=env.number(
                "LABVIRT_EVENTS_KEEPALIVE_SECONDS", cls.events_keepalive_seconds, minimum=0.5
            ),
            teardown_timeout_seconds=env.number(
                "LABVIRT_TEARDOWN_TIMEOUT_SECONDS", cls.teardown_timeout_seconds, minimum=1
            ),
            kube_request_timeout_seconds=env.number(
                "LABVIRT_KUBE_REQUEST_TIMEOUT_SECONDS",
                cls.kube_request_timeout_seconds,
                minimum=1,
            ),
            prewarm_interval_seconds=env.number(
                "LABVIRT_PREWARM_INTERVAL_SECONDS", cls.prewarm_interval_seconds, minimum=0.1
            ),
            prewarm_batch=env.integer("LABVIRT_PREWARM_BATCH", cls.prewarm_batch, minimum=1),
            prewarm_max_in_flight=env.integer(
                "LABVIRT_PREWARM_MAX_IN_FLIGHT", cls.prewarm_max_in_flight, minimum=1
            ),
            pool_max_warm_age_seconds=env.number(
                "LABVIRT_POOL_MAX_WARM_AGE_SECONDS", cls.pool_max_warm_age_seconds, minimum=60
            ),
            region_heartbeat_seconds=env.number(
                "LABVIRT_REGION_HEARTBEAT_SECONDS", cls.region_heartbeat_seconds, minimum=0.2
            ),
            idempotency_ttl_seconds=env.integer(
                "LABVIRT_IDEMPOTENCY_TTL_SECONDS", cls.idempotency_ttl_seconds, minimum=1
            ),
            limits=limits_from_env(env),
            metrics_tokens=env.tokens("LABVIRT_METRICS_TOKENS"),
            metrics_port=env.integer(
                "LABVIRT_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535
            ),
            metrics_dir=env.path("LABVIRT_METRICS_DIR"),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        try:
            sentinel_target(self.redis_url)
        except RedisUrlError as exc:
            raise ConfigError(str(exc)) from exc
        if self.mode is Mode.PRODUCTION and not self.frontend_tokens:
            raise ConfigError(
                "LABVIRT_FRONTEND_TOKENS is empty: production refuses to serve without "
                "frontend tokens (set LABVIRT_MODE=dev for a local playground)"
            )
        if self.mode is Mode.PRODUCTION and not self.admin_tokens:
            raise ConfigError(
                "LABVIRT_ADMIN_TOKENS is empty: production refuses to start without admin tokens"
            )
        if self.default_region not in {c.region for c in self.clusters}:
            raise ConfigError(
                f"LABVIRT_DEFAULT_REGION={self.default_region!r} names no configured cluster "
                f"(regions: {', '.join(c.region for c in self.clusters) or 'none'})"
            )
        overlap = self.frontend_tokens & self.admin_tokens
        if overlap:
            raise ConfigError("a token must not be both a frontend token and an admin token")
        if self.frontend_tokens & self.metrics_tokens:
            raise ConfigError(
                "LABVIRT_METRICS_TOKENS: a scrape token must not also be a frontend token"
            )

    def cluster(self, region: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.region == region:
                return cluster
        raise KeyError(region)

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(c.region for c in self.clusters)


def _clusters(env: EnvReader, *, default_region: str, namespace: str) -> tuple[Cluster, ...]:
    """``LABVIRT_CLUSTERS_FILE`` (``shared.cluster_config``), else the one-line
    ``LABVIRT_CLUSTERS=eu=/k/eu.yaml,us=/k/us.yaml[@context]``, else one cluster.

    The single cluster comes from ``LABVIRT_KUBECONFIG`` (and ``LABVIRT_KUBE_CONTEXT``), or
    the in-cluster service account when that is unset too.
    """
    path = env.path("LABVIRT_CLUSTERS_FILE")
    spec = env.string("LABVIRT_CLUSTERS", "")
    if path is not None and spec:
        raise ConfigError(
            "LABVIRT_CLUSTERS_FILE and LABVIRT_CLUSTERS are both set: give the regions once "
            "(the file is the full form)"
        )
    if path is not None:
        try:
            return clusters_from_file(path, namespace=namespace)
        except ClusterConfigError as exc:
            raise ConfigError(f"LABVIRT_CLUSTERS_FILE={str(path)!r}: {exc}") from None
    if not spec:
        kubeconfig = env.path("LABVIRT_KUBECONFIG")
        context = env.string("LABVIRT_KUBE_CONTEXT", "") or None
        return (Cluster(default_region, kubeconfig, context, namespace),)
    try:
        return clusters_from_spec(spec, namespace=namespace)
    except ClusterConfigError as exc:
        raise ConfigError(f"LABVIRT_CLUSTERS: {exc}") from None
