"""The deploy manifests, built once per test session."""

from __future__ import annotations

import pytest

from tests.deploy.kustomize import KUSTOMIZATIONS, Manifest, build


@pytest.fixture(scope="session")
def builds() -> dict[str, list[Manifest]]:
    """Every kustomization's rendered objects, by build name (base, production, emulation)."""
    return {name: build(directory) for name, directory in KUSTOMIZATIONS.items()}


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def built(request: pytest.FixtureRequest, builds: dict[str, list[Manifest]]) -> list[Manifest]:
    """One build's objects; tests using it run once per kustomization."""
    return builds[request.param]
