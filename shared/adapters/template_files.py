"""Templates from YAML: the shipped defaults, or the file ``LABVIRT_TEMPLATES`` names."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from shared.domain.template_parsing import TemplateError, parse_templates
from shared.domain.templates import Template


def load_templates(path: Path | None) -> dict[str, Template]:
    if path is None:
        text = resources.files("shared.templates").joinpath("default.yaml").read_text()
        source = "the shipped templates"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise TemplateError(f"cannot read templates file {path}: {exc.strerror}") from exc
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TemplateError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TemplateError(f"{source} must be a mapping with a 'templates' key")
    templates = parse_templates(data)
    if not templates:
        raise TemplateError(f"{source} defines no templates")
    return templates
