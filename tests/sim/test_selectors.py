"""Label and field selectors: syntax, matching and the API server's errors."""

from __future__ import annotations

import pytest

from labvirt.sim.errors import ApiError
from labvirt.sim.selectors import parse_field_selector, parse_label_selector

LABELS = {"app": "web", "tier": "front", "kubevirt.io/nodeName": "node01"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app!=web", False),
        ("app!=db", True),
        ("missing!=x", True),
        ("app in (web, db)", True),
        ("app in (db)", False),
        ("app notin (db,cache)", True),
        ("missing notin (db)", True),
        ("tier", True),
        ("!tier", False),
        ("!missing", True),
        ("app=web,tier=front", True),
        ("app=web,tier=back", False),
        ("kubevirt.io/nodeName=node01", True),
        (" app = web , tier ", True),
    ],
)
def test_label_selector_matches(selector, matches):
    assert parse_label_selector(selector).matches(LABELS) is matches


def test_label_selector_on_objects_without_labels():
    assert parse_label_selector("!a").matches(None)
    assert not parse_label_selector("a").matches(None)


@pytest.mark.parametrize("selector", ["app=web,", "=web", "app in web", "app=web tier", "a=(b"])
def test_malformed_label_selector_is_400(selector):
    with pytest.raises(ApiError) as caught:
        parse_label_selector(selector)
    assert caught.value.code == 400


def test_field_selector_supports_name_and_namespace_only():
    obj = {"metadata": {"name": "vm1", "namespace": "ns1"}}
    assert parse_field_selector("metadata.name=vm1").matches(obj)
    assert parse_field_selector("metadata.name==vm1,metadata.namespace=ns1").matches(obj)
    assert not parse_field_selector("metadata.name!=vm1").matches(obj)
    assert parse_field_selector("metadata.name=vm1").value_of("metadata.name") == "vm1"
    with pytest.raises(ApiError) as caught:
        parse_field_selector("status.phase=Running")
    assert caught.value.code == 400
    assert caught.value.message == "field label not supported: status.phase"


def test_field_selector_with_extra_fields_per_type():
    fields = {"involvedObject.name": lambda o: o.get("involvedObject", {}).get("name")}
    event = {"involvedObject": {"name": "vm1"}}
    assert parse_field_selector("involvedObject.name=vm1", fields).matches(event)
    with pytest.raises(ApiError):
        parse_field_selector("metadata.name=x", fields)


def test_malformed_field_selector_is_400():
    with pytest.raises(ApiError) as caught:
        parse_field_selector("metadata.name")
    assert caught.value.code == 400
