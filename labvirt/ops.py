"""``labvirt ops``: an operator's day through the admin API, from a terminal.

    labvirt ops failed list|show ID|requeue ID|requeue --all|purge ID
    labvirt ops sessions list|show ID|close ID
    labvirt ops pools list|resize TEMPLATE SIZE|pause [TEMPLATE]|resume [TEMPLATE]
    labvirt ops drain REGION | labvirt ops undrain REGION

It reads the services' own variables: the API at ``LABVIRT_API_URL`` (else
``http://LABVIRT_API_HOST:LABVIRT_API_PORT``) and the first of ``LABVIRT_ADMIN_TOKENS`` (or
``LABVIRT_ADMIN_TOKEN``). Tables fit 80 columns; ``--json`` prints the API's answer as it is.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

WIDTH = 80


class OpsError(Exception):
    """What the API (or the connection to it) said went wrong."""


class AdminApi:
    def __init__(self, environ: Mapping[str, str]) -> None:
        host = environ.get("LABVIRT_API_HOST") or "127.0.0.1"
        if host == "0.0.0.0":  # noqa: S104 - a listen address, not one to call  # nosec B104
            host = "127.0.0.1"
        default = f"http://{host}:{environ.get('LABVIRT_API_PORT') or 8080}"
        self.url = (environ.get("LABVIRT_API_URL") or default).rstrip("/")
        if urllib.parse.urlsplit(self.url).scheme not in {"http", "https"}:
            # urlopen would also read file: and other schemes: only the API is asked.
            raise OpsError(f"LABVIRT_API_URL={self.url!r} is not an http:// or https:// URL")
        tokens = environ.get("LABVIRT_ADMIN_TOKEN") or environ.get("LABVIRT_ADMIN_TOKENS") or ""
        self.token = tokens.split(",")[0].strip()
        if not self.token:
            raise OpsError("set LABVIRT_ADMIN_TOKENS (or LABVIRT_ADMIN_TOKEN) to an admin token")
        self.operator = environ.get("LABVIRT_OPERATOR") or _user()

    def call(
        self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None
    ) -> Any:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("X-Labvirt-Operator", self.operator)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            # http(s) only: the scheme is checked when the URL is read.
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310  # nosec B310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise OpsError(_api_error(exc)) from exc
        except urllib.error.URLError as exc:
            raise OpsError(f"cannot reach the API at {self.url}: {exc.reason}") from exc
        return json.loads(raw) if raw else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _api_error(exc: urllib.error.HTTPError) -> str:
    """The API's problem (RFC 9457) as an operator reads it: status, code, detail, and what
    was wrong with which field."""
    try:
        problem = json.loads(exc.read())
        said = f"{exc.code} {problem['code']}: {problem['detail']}"
        fields = [f"\n  {e['pointer']}: {e['detail']}" for e in problem.get("errors", [])]
    except (ValueError, KeyError, TypeError):
        return f"{exc.code} {exc.reason}"
    return said + "".join(fields)


def table(
    rows: Sequence[Sequence[Any]],
    headers: Sequence[str],
    width: int = WIDTH,
    *,
    whole: Sequence[int] = (0,),
) -> str:
    """Left-aligned columns; the widest are cut (with …) until the table fits ``width``,
    except the ``whole`` ones (ids an operator copies into the next command)."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    cuttable = [i for i in range(len(widths)) if i not in whole]
    while sum(widths) + 2 * (len(widths) - 1) > width and cuttable:
        widest = max(cuttable, key=lambda i: widths[i])
        if widths[widest] <= 6:
            break
        widths[widest] -= 1
    lines = []
    for row in cells:
        parts = [_fit(value, w) for value, w in zip(row, widths, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:  # a Unix time
        return datetime.fromtimestamp(value, UTC).strftime("%m-%d %H:%M:%S")
    return str(value).replace("\n", " ")


def _fit(value: str, width: int) -> str:
    return value.ljust(width) if len(value) <= width else value[: width - 1] + "…"


def _show(data: Any, as_json: bool, render: Any) -> None:
    print(json.dumps(data, indent=2) if as_json else render(data))


def failed(api: AdminApi, args: argparse.Namespace) -> None:
    filters = {
        "task": args.task,
        "status": args.status,
        "session": args.session,
        "region": args.region,
    }
    if args.action == "list":
        data = api.call("GET", "/v1/admin/failed", query={**filters, "limit": args.limit})
        rows = [
            (
                f["id"],
                f["task"].removeprefix("labvirt."),
                f["status"],
                f["attempts"],
                f["last_failed_at"],
                f["error"],
            )
            for f in data["failed"]
        ]
        headers = ("ID", "TASK", "STATUS", "TRIES", "LAST", "ERROR")
        _show(data, args.json, lambda _d: table(rows, headers) + f"\n{data['total']} in all")
    elif args.action == "show":
        data = api.call("GET", f"/v1/admin/failed/{_need(args.id)}")
        _show(data, args.json, _render_failure)
    elif args.action == "requeue" and args.all:
        data = api.call("POST", "/v1/admin/failed/requeue", body=filters)
        _show(
            data,
            args.json,
            lambda d: f"requeued {len(d['requeued'])}, already queued {len(d['skipped'])}",
        )
    elif args.action == "requeue":
        data = api.call("POST", f"/v1/admin/failed/{_need(args.id)}/requeue")
        _show(
            data,
            args.json,
            lambda d: ("requeued " if d["requeued"] else "already queued ") + d["failed"]["id"],
        )
    elif args.action == "purge":
        data = api.call("DELETE", f"/v1/admin/failed/{_need(args.id)}")
        _show(data, args.json, lambda d: f"purged {d['purged']}")


def _render_failure(data: dict[str, Any]) -> str:
    lines = [
        f"{data['id']}  {data['task']}  {data['status']}",
        f"payload:  {json.dumps(data['payload'])}",
        f"attempts: {data['attempts']} (first {_cell(data['first_failed_at'])}, "
        f"last {_cell(data['last_failed_at'])})",
        f"error:    {data['error_type']}: {data['error']}",
        "history:",
        *[f"  {_cell(h['at'])}  {h.get('error') or 'resolved'}" for h in data["history"]],
        "requeues:",
        *([f"  {_cell(r['at'])}  by {r['by']}" for r in data["requeues"]] or ["  none"]),
        "traceback:",
        data["traceback"],
    ]
    return "\n".join(lines)


def sessions(api: AdminApi, args: argparse.Namespace) -> None:
    if args.action == "list":
        query = {
            "user": args.user,
            "template": args.template,
            "region": args.region,
            "state": args.state,
            "limit": args.limit,
        }
        data = api.call("GET", "/v1/admin/sessions", query=query)
        rows = [
            (s["id"], s["user"], s["template"], s["region"], s["state"], s["expires_at"])
            for s in data["sessions"]
        ]
        headers = ("ID", "USER", "TEMPLATE", "REGION", "STATE", "EXPIRES")
        _show(data, args.json, lambda _d: table(rows, headers) + f"\n{data['total']} in all")
    elif args.action == "show":
        data = api.call("GET", f"/v1/sessions/{_need(args.id)}")
        _show(data, args.json, lambda d: json.dumps(d, indent=2))
    elif args.action == "close":
        data = api.call("DELETE", f"/v1/sessions/{_need(args.id)}")
        _show(data, args.json, lambda d: f"{d['id']} is {d['state']}")


def pools(api: AdminApi, args: argparse.Namespace) -> None:
    if args.action == "list":
        data = api.call("GET", "/v1/admin/pools")
        rows = [
            (
                p["region"],
                p["template"],
                p["mode"],
                p["target"],
                p["ready"],
                p["in_flight"],
                "yes" if p["paused"] else "no",
                p["hit_rate_1h"],
            )
            for p in data["pools"]
        ]
        headers = ("REGION", "TEMPLATE", "MODE", "TARGET", "READY", "BOOTING", "PAUSED", "HIT/1H")
        _show(data, args.json, lambda _d: table(rows, headers))
        return
    if args.action in ("pause", "resume") and args.template is None:
        data = api.call("PUT", "/v1/admin/pools", body={"paused": args.action == "pause"})
        _show(data, args.json, lambda d: f"every pool {'paused' if d['paused'] else 'resumed'}")
        return
    resize = args.action == "resize"
    change: dict[str, Any] = {"size": args.size} if resize else {"paused": args.action == "pause"}
    path = f"/v1/admin/pools/{_need(args.template)}"
    data = api.call("PUT", path, body=change, query={"region": args.region})
    _show(
        data,
        args.json,
        lambda d: (
            f"{d['region']}/{d['template']}: target {d['target']}, "
            f"{'paused' if d['paused'] else 'running'}"
        ),
    )


def drain(api: AdminApi, args: argparse.Namespace) -> None:
    drained = args.command == "drain"
    data = api.call("PUT", f"/v1/admin/regions/{args.region}", body={"drained": drained})
    _show(
        data,
        args.json,
        lambda d: (
            f"region {d.get('region', args.region)} "
            f"{'drained: no new sessions or warm VMs' if drained else 'open again'}"
        ),
    )


def _need(value: str | None) -> str:
    if not value:
        raise OpsError("this action needs an id or a name")
    return urllib.parse.quote(value, safe="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labvirt ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    fail = commands.add_parser("failed", help="tasks that failed for good")
    fail.add_argument("action", choices=["list", "show", "requeue", "purge"])
    fail.add_argument("id", nargs="?")
    fail.add_argument("--all", action="store_true", help="requeue every failed task matching")
    fail.add_argument("--task")
    fail.add_argument("--status", choices=["failed", "requeued", "resolved"])
    fail.add_argument("--session")
    fail.add_argument("--region")
    fail.add_argument("--limit", type=int, default=50)
    fail.set_defaults(run=failed)
    sess = commands.add_parser("sessions", help="learners' sessions")
    sess.add_argument("action", choices=["list", "show", "close"])
    sess.add_argument("id", nargs="?")
    for option in ("--user", "--template", "--region", "--state"):
        sess.add_argument(option)
    sess.add_argument("--limit", type=int, default=100)
    sess.set_defaults(run=sessions)
    pool = commands.add_parser("pools", help="warm pools")
    pool.add_argument("action", choices=["list", "resize", "pause", "resume"])
    pool.add_argument("template", nargs="?")
    pool.add_argument("size", nargs="?", type=int)
    pool.add_argument("--region")
    pool.set_defaults(run=pools)
    for name, text in (
        ("drain", "stop new sessions and prewarming in a region"),
        ("undrain", "open a drained region again"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("region")
        command.set_defaults(run=drain)
    return parser


def main(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    if args.command == "pools" and args.action == "resize" and args.size is None:
        parser.error("pools resize needs TEMPLATE SIZE")
    try:
        args.run(AdminApi(os.environ if environ is None else environ), args)
    except OpsError as exc:
        print(f"labvirt ops: {exc}", file=sys.stderr)
        return 1
    return 0
