"""PATCH semantics: RFC 7386 merge, RFC 6902 JSON patch, apply, light strategic merge."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labvirt.sim.errors import ApiError
from labvirt.sim.patch import (
    apply_json_patch,
    apply_merge_patch,
    apply_patch,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)

# -- RFC 7386 -----------------------------------------------------------------------------------

# The examples of RFC 7386, appendix A.
RFC7386_CASES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7386_CASES)
def test_merge_patch_follows_rfc7386(target, patch, expected):
    assert merge_patch(target, patch) == expected


def test_merge_patch_never_mutates_its_inputs():
    target = {"metadata": {"labels": {"a": "1"}}, "spec": {"x": [1]}}
    patch = {"metadata": {"labels": {"b": "2", "a": None}}}
    before = json.dumps([target, patch], sort_keys=True)
    result = merge_patch(target, patch)
    assert result == {"metadata": {"labels": {"b": "2"}}, "spec": {"x": [1]}}
    assert json.dumps([target, patch], sort_keys=True) == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=2), children, max_size=3)
    ),
    max_leaves=10,
)


@given(json_values, st.dictionaries(st.text(max_size=2), json_values, max_size=3))
def test_merge_patch_is_idempotent(target, patch):
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_merge_patch_body_must_be_an_object():
    with pytest.raises(ApiError) as caught:
        apply_merge_patch({}, b"[1]")
    assert caught.value.code == 400
    with pytest.raises(ApiError) as caught:
        apply_merge_patch({}, b"{not json")
    assert caught.value.code == 400


# -- RFC 6902 -----------------------------------------------------------------------------------


def test_json_patch_operations():
    doc = {"metadata": {"labels": {"a/b": "1", "m~n": "2"}}, "list": [1, 2, 3]}
    ops = [
        {"op": "test", "path": "/metadata/labels/a~1b", "value": "1"},
        {"op": "test", "path": "/metadata/labels/m~0n", "value": "2"},
        {"op": "add", "path": "/list/1", "value": 9},
        {"op": "add", "path": "/list/-", "value": 4},
        {"op": "remove", "path": "/list/0"},
        {"op": "replace", "path": "/metadata/labels/m~0n", "value": "3"},
        {"op": "copy", "from": "/list", "path": "/copied"},
        {"op": "move", "from": "/metadata/labels/a~1b", "path": "/moved"},
    ]
    assert json_patch(doc, ops) == {
        "metadata": {"labels": {"m~n": "3"}},
        "list": [9, 2, 3, 4],
        "copied": [9, 2, 3, 4],
        "moved": "1",
    }
    assert doc["list"] == [1, 2, 3], "the input is untouched"


def test_json_patch_copy_is_deep():
    result = json_patch(
        {"a": {"b": 1}},
        [
            {"op": "copy", "from": "/a", "path": "/c"},
            {"op": "replace", "path": "/c/b", "value": 2},
        ],
    )
    assert result == {"a": {"b": 1}, "c": {"b": 2}}


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "test", "path": "/a", "value": 2}],
        [{"op": "test", "path": "/a", "value": True}],  # 1 is not true in JSON
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "add", "path": "/missing/child", "value": 1}],
        [{"op": "add", "path": "/list/5", "value": 1}],
        [{"op": "add", "path": "/list/01", "value": 1}],
        [{"op": "move", "from": "/obj", "path": "/obj/inner"}],
        [{"op": "add", "path": "no-slash", "value": 1}],
    ],
)
def test_json_patch_that_does_not_apply_is_422(ops):
    with pytest.raises(ApiError) as caught:
        json_patch({"a": 1, "list": [1], "obj": {}}, ops)
    assert caught.value.code == 422
    assert caught.value.reason == "Invalid"


def test_test_operation_treats_numbers_as_json_does():
    assert json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0}]) == {"a": 1}


@pytest.mark.parametrize(
    "body",
    [
        b'{"op": "add"}',
        b'[{"op": "frobnicate", "path": "/a"}]',
        b'[{"op": "add", "path": "/a"}]',
        b'[{"op": "move", "path": "/a"}]',
        b"[1]",
        b"not json",
    ],
)
def test_malformed_json_patch_is_400(body):
    with pytest.raises(ApiError) as caught:
        apply_json_patch({"a": 1}, body)
    assert caught.value.code == 400


def test_test_failure_message_names_the_path():
    with pytest.raises(ApiError) as caught:
        json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    assert "testing value /a failed" in caught.value.message


# -- apply and strategic merge ------------------------------------------------------------------


def test_apply_patch_merges_yaml_over_the_live_object():
    live = {"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"k": 1}}
    body = b"metadata:\n  labels:\n    b: '2'\nspec:\n  k: 2\n"
    assert apply_patch(live, body) == {
        "metadata": {"name": "x", "labels": {"a": "1", "b": "2"}},
        "spec": {"k": 2},
    }
    assert apply_patch(None, b'{"kind": "X"}') == {"kind": "X"}
    with pytest.raises(ApiError) as caught:
        apply_patch(live, b"- a list")
    assert caught.value.code == 400


def test_strategic_merge_merges_keyed_lists_and_drops_directives():
    service = {"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 22, "name": "ssh"}]}}
    patch = {
        "$setElementOrder/ports": [{"port": 22}, {"port": 80}, {"port": 443}],
        "spec": {
            "$setElementOrder/ports": [{"port": 22}, {"port": 443}],
            "ports": [
                {"port": 22, "name": "sshd"},
                {"port": 80, "$patch": "delete"},
                {"port": 443, "name": "https"},
            ],
        },
    }
    result = strategic_merge_patch(service, patch, {("spec", "ports"): "port"})
    assert result == {
        "spec": {"ports": [{"port": 22, "name": "sshd"}, {"port": 443, "name": "https"}]}
    }


def test_strategic_merge_replace_directive_and_unkeyed_lists():
    target = {"spec": {"selector": {"a": "1", "b": "2"}, "list": [1, 2]}}
    patch = {"spec": {"selector": {"$patch": "replace", "c": "3"}, "list": [3]}}
    assert strategic_merge_patch(target, patch, {}) == {
        "spec": {"selector": {"c": "3"}, "list": [3]}
    }
