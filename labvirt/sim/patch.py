"""The PATCH formats of the Kubernetes API, as pure functions over JSON documents.

RFC 7386 merge patch, RFC 6902 JSON patch, server-side apply (treated as a merge of the applied
configuration, without field ownership) and a light strategic merge patch for built-in types.
Inputs are never mutated; errors are ``ApiError`` with the codes and wording of the API server
(400 for a patch that cannot be decoded, 422 for one that does not apply).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import yaml

from labvirt.sim.errors import ApiError, bad_request

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)

# Strategic merge keys of the built-in types the simulator serves: lists of objects under these
# paths merge element by element on the key; every other list is replaced, as in a merge patch.
MergeKeys = Mapping[tuple[str, ...], str]


def _unprocessable(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


def decode_json(body: bytes, what: str = "patch") -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"error decoding {what}: {exc}") from exc


# -- RFC 7386 ---------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch; ``null`` deletes a key, objects merge, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = merge_patch(result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply_merge_patch(current: dict[str, Any], body: bytes) -> dict[str, Any]:
    patch = decode_json(body)
    if not isinstance(patch, dict):
        raise bad_request(
            f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
            "map[string]interface {}"
        )
    result: dict[str, Any] = merge_patch(current, patch)
    return result


# -- server-side apply ------------------------------------------------------------------------


def parse_apply_body(body: bytes) -> dict[str, Any]:
    """The applied configuration: YAML (JSON is YAML too), one object."""
    try:
        applied = yaml.safe_load(body.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise bad_request(f"error decoding YAML: {exc}") from exc
    if not isinstance(applied, dict):
        raise bad_request("error decoding YAML: the applied configuration must be an object")
    return applied


def apply_patch(current: dict[str, Any] | None, body: bytes) -> dict[str, Any]:
    """Server-side apply without managed fields: the applied configuration merged over the live
    object (or, when there is none, the object to create)."""
    applied = parse_apply_body(body)
    if current is None:
        return applied
    result: dict[str, Any] = merge_patch(current, applied)
    return result


# -- strategic merge patch (light) ------------------------------------------------------------

_DIRECTIVE_PREFIXES = ("$setElementOrder/", "$deleteFromPrimitiveList/", "$retainKeys")


def strategic_merge_patch(
    target: Any, patch: Any, merge_keys: MergeKeys, path: tuple[str, ...] = ()
) -> Any:
    """A strategic merge patch for the few list merge keys of the built-in types we serve.

    Honours ``$patch: replace|delete`` on maps and on list elements and drops the ordering
    directives kubectl sends; it does not reorder lists.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "replace":
        return copy.deepcopy(body)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in body.items():
        if key.startswith(_DIRECTIVE_PREFIXES):
            continue
        sub = (*path, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value, merge_keys, sub)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and sub in merge_keys:
            result[key] = _merge_list(result.get(key), value, merge_keys[sub], merge_keys, sub)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(
    current: Any, patch: list[Any], key: str, merge_keys: MergeKeys, path: tuple[str, ...]
) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(item) for item in patch if item.get("$patch") != "replace"]
    merged = list(current) if isinstance(current, list) else []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            merged.append(copy.deepcopy(item))
            continue
        index = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, dict) and old.get(key) == item[key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
            continue
        if index is None:
            merged.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            merged[index] = strategic_merge_patch(merged[index], item, merge_keys, path)
    return merged


def apply_strategic_merge_patch(
    current: dict[str, Any], body: bytes, merge_keys: MergeKeys
) -> dict[str, Any]:
    patch = decode_json(body)
    if not isinstance(patch, dict):
        raise bad_request(
            f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
            "map[string]interface {}"
        )
    result = strategic_merge_patch(current, patch, merge_keys)
    if not isinstance(result, dict):
        raise _unprocessable("the patch deleted the whole object")
    return result


# -- RFC 6902 ---------------------------------------------------------------------------------

_OPERATIONS = ("add", "remove", "replace", "move", "copy", "test")


def apply_json_patch(current: dict[str, Any], body: bytes) -> dict[str, Any]:
    operations = decode_json(body)
    result = json_patch(current, operations)
    if not isinstance(result, dict):
        raise _unprocessable("the patch did not produce an object")
    return result


def json_patch(document: Any, operations: Any) -> Any:
    """Apply an RFC 6902 patch. Malformed operations are 400; ones that do not apply are 422."""
    if not isinstance(operations, list):
        raise bad_request(
            f"json: cannot unmarshal {_json_type(operations)} into Go value of type jsonpatch.Patch"
        )
    doc = copy.deepcopy(document)
    for operation in operations:
        doc = _apply_operation(doc, _check_operation(operation))
    return doc


def _check_operation(operation: Any) -> dict[str, Any]:
    if not isinstance(operation, dict):
        raise bad_request(
            f"json: cannot unmarshal {_json_type(operation)} into Go value of type "
            "jsonpatch.Operation"
        )
    op = operation.get("op")
    if op not in _OPERATIONS:
        raise bad_request(f"Unexpected kind: {op}")
    if not isinstance(operation.get("path"), str):
        raise bad_request(f"{op} operation missing path")
    if op in ("move", "copy") and not isinstance(operation.get("from"), str):
        raise bad_request(f"{op} operation missing from")
    if op in ("add", "replace", "test") and "value" not in operation:
        raise bad_request(f"{op} operation missing value")
    return operation


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _unprocessable(f'JSON pointer must be empty or start with a "/": "{path}"')
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(step: str, length: int, path: str, *, allow_end: bool) -> int:
    if step == "-" and allow_end:
        return length
    if not step.isdigit() or (len(step) > 1 and step[0] == "0"):
        raise _unprocessable(f"invalid array index {step!r} in path: {path}")
    index = int(step)
    if index > length or (index == length and not allow_end):
        raise _unprocessable(f"Unable to access invalid index: {index}: invalid index referenced")
    return index


def _parent(doc: Any, parts: list[str], path: str, op: str) -> Any:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict):
            if part not in node:
                raise _unprocessable(
                    f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
                )
            node = node[part]
        elif isinstance(node, list):
            node = node[_index(part, len(node), path, allow_end=False)]
        else:
            raise _unprocessable(
                f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
            )
    return node


def _get(doc: Any, path: str, op: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path, op)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _unprocessable(
                f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
            )
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(last, len(parent), path, allow_end=False)]
    raise _unprocessable(
        f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
    )


def _add(doc: Any, path: str, value: Any, op: str = "add") -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts, path, op)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), path, allow_end=True), value)
    else:
        raise _unprocessable(
            f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
        )
    return doc


def _remove(doc: Any, path: str, op: str = "remove") -> tuple[Any, Any]:
    parts = _pointer(path)
    if not parts:
        raise _unprocessable(f"{op} operation does not apply: cannot remove the whole document")
    parent = _parent(doc, parts, path, op)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _unprocessable(
                f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
            )
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(last, len(parent), path, allow_end=False))
    raise _unprocessable(
        f"{op} operation does not apply: doc is missing path: {path!r}: missing value"
    )


def _apply_operation(doc: Any, operation: dict[str, Any]) -> Any:
    op = operation["op"]
    path = operation["path"]
    if op == "add":
        return _add(doc, path, copy.deepcopy(operation["value"]))
    if op == "remove":
        return _remove(doc, path)[0]
    if op == "replace":
        _get(doc, path, "replace")
        parts = _pointer(path)
        if not parts:
            return copy.deepcopy(operation["value"])
        parent = _parent(doc, parts, path, op)
        if isinstance(parent, dict):
            parent[parts[-1]] = copy.deepcopy(operation["value"])
        else:
            parent[_index(parts[-1], len(parent), path, allow_end=False)] = copy.deepcopy(
                operation["value"]
            )
        return doc
    if op == "test":
        actual = _get(doc, path, "test")
        if not _json_equal(actual, operation["value"]):
            raise _unprocessable(f"testing value {path} failed: test failed")
        return doc
    source = operation["from"]
    if op == "move":
        if source == path:
            return doc
        if path.startswith(source + "/"):
            raise _unprocessable(f"move operation does not apply: cannot move {source} into {path}")
        doc, value = _remove(doc, source, "move")
        return _add(doc, path, value, "move")
    # copy
    value = copy.deepcopy(_get(doc, source, "copy"))
    return _add(doc, path, value, "copy")


def _json_equal(a: Any, b: Any) -> bool:
    # JSON has one number type: 1 == 1.0, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "object"
