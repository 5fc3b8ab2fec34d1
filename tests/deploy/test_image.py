"""The container image carries what the browser pages load: the npm packages from the lock."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.deploy.kustomize import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"


def final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]


def test_the_image_installs_the_npm_packages_from_the_lock() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY package.json package-lock.json" in text
    assert re.search(r"RUN npm ci\b", text)


def test_the_processes_find_the_packages_where_the_image_puts_them() -> None:
    stage = final_stage(DOCKERFILE.read_text())
    copied = re.search(r"COPY --from=\w+ \S+node_modules (\S+)", stage)
    assert copied is not None, "the final stage copies no node_modules"
    workdir = re.search(r"^WORKDIR (\S+)", stage, flags=re.MULTILINE)
    assert workdir is not None
    target = copied.group(1).replace("./", workdir.group(1).rstrip("/") + "/", 1)
    setting = re.search(r"LABVIRT_NODE_MODULES=(\S+)", stage)
    assert setting is not None, "the image does not say where the packages are"
    assert setting.group(1) == target.rstrip("/")


def test_every_file_the_services_read_is_packaged() -> None:
    """``pip install .`` (the image) carries only .py files and the package-data patterns."""

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    unpackaged = []
    for top in ("shared", "services", "labvirt"):
        for path in (REPO / top).rglob("*"):
            if not path.is_file() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(REPO)
            covered = any(
                fnmatch.fnmatch(
                    str(relative.relative_to(*package.split("."))), pattern.split("#")[0].strip()
                )
                for package, globs in patterns.items()
                if relative.is_relative_to(REPO.joinpath(*package.split(".")).relative_to(REPO))
                for pattern in globs
            )
            if not covered:
                unpackaged.append(str(relative))
    assert unpackaged == []
