"""make_admin_app(): the operator's JSON API, served only on the admin unix socket.

Mirrors EC2's API: instances (add, remove, modify metadata options), associations
(associate, replace, disassociate), profiles, sessions (list, rotate now), status. Every
change is persisted before it is acknowledged and takes effect before the call returns;
the verbs that promise a session (associate, replace, rotate) also wait for its issue (after
`associate`, the instance's iam/ tree serves a session, or its failure document).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from imdsd.admin.keys import (
    APPLY,
    CLOCK,
    DUE,
    INFO,
    INVENTORY,
    LEDGER,
    LISTENING,
    ROTATE,
    SESSIONS,
    SETTLED,
    SOURCE,
    Apply,
    Due,
    Listening,
    Rotate,
    Settled,
    Source,
)
from imdsd.admin.views import instance_view, profile_view, session_view
from imdsd.budgets import Ledger
from imdsd.clock import Clock
from imdsd.config.instances import instance_from
from imdsd.errors import BadRequest, ConfigError, ConflictError, ImdsdError, NotFoundError
from imdsd.inventory import Inventory
from imdsd.sessions import SessionCache

log = structlog.get_logger("imdsd.admin")
routes = web.RouteTableDef()
LISTING_STEP = 50  # rows made per turn of the loop in a listing (~0.5-1 ms)
T = TypeVar("T")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is JSON with a code and a message the CLI prints as it is."""
    try:
        return await handler(request)
    except ImdsdError as exc:  # a refusal names itself (errors.py); the rest is a 500
        if exc.http_status >= 500:  # e.g. the state file cannot be written: nothing was changed
            log.error("admin request failed", error=exc.__class__.__name__, path=request.path)
        extra = {"problems": [str(p) for p in exc.problems]} if isinstance(exc, ConfigError) else {}
        return _error(exc.http_status, exc.code, str(exc), **extra)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason.replace(" ", ""), exc.reason)
    except Exception as exc:  # imdsd's own bug: its class logged, a JSON 500, never a traceback
        # its class only: the message and the frames may carry what the caller sent
        log.error("admin request failed: internal error", error=exc.__class__.__name__,
                  path=request.path)  # fmt: skip
        return _error(500, "InternalError", "imdsd failed to handle the request; see its log")


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key!r} must be a non-empty string")
    return value


def _instance_or_404(request: web.Request) -> str:
    iid = request.match_info["id"]
    if request.app[INVENTORY].instance(iid) is None:
        raise NotFoundError(f"instance {iid} does not exist")
    return iid


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    inventory, sessions = request.app[INVENTORY], request.app[SESSIONS]
    now = request.app[CLOCK].now()
    states = Counter(sessions.state(a.instance_id, now) for a in inventory.associations())
    info: dict[str, Any] = request.app[INFO]
    return web.json_response({
        **info,
        "inventory": request.app[SOURCE](),
        "scoped_listeners": request.app[LISTENING](),
        "instances": dict(Counter(inventory.origin(i.id) for i in inventory.instances())),
        "associations": dict(
            Counter(inventory.association_origin(a.instance_id) for a in inventory.associations())
        ),
        "sessions": dict(states),
        "profiles": len(inventory.profiles()),
        # guests throttled in the last hour -> seconds since (strangers: every unknown address)
        "throttled_recently": request.app[LEDGER].throttled_recently(),
    })  # fmt: skip


@routes.get("/v1/instances")
async def list_instances(request: web.Request) -> web.StreamResponse:
    inventory = request.app[INVENTORY]
    return await _listing(request, inventory.instances(), lambda i: instance_view(inventory, i))


@routes.get("/v1/instances/{id}")
async def show_instance(request: web.Request) -> web.Response:
    inventory = request.app[INVENTORY]
    instance = inventory.instance(_instance_or_404(request))
    assert instance is not None  # noqa: S101 -- checked just above
    return web.json_response(instance_view(inventory, instance))


@routes.post("/v1/instances")
async def add_instance(request: web.Request) -> web.Response:
    inventory = request.app[INVENTORY]
    instance = instance_from(await _body(request))
    request.app[APPLY](await inventory.commit(lambda: inventory.add_instance(instance)))
    log.info("instance added", instance=instance.id, addresses=list(instance.addresses))
    effective = inventory.instance(instance.id)  # what is now served: the reply shows that
    assert effective is not None  # noqa: S101 -- just added
    return web.json_response(instance_view(inventory, effective), status=201)


@routes.delete("/v1/instances/{id}")
async def remove_instance(request: web.Request) -> web.Response:
    iid, inventory = request.match_info["id"], request.app[INVENTORY]
    request.app[APPLY](await inventory.commit(lambda: inventory.remove_instance(iid)))
    log.info("instance removed", instance=iid)
    return web.json_response({"removed": iid})


@routes.patch("/v1/instances/{id}/metadata-options")
async def modify_options(request: web.Request) -> web.Response:
    inventory = request.app[INVENTORY]
    current = inventory.instance(_instance_or_404(request))
    assert current is not None  # noqa: S101 -- checked just above
    changed = instance_from(await _body(request), current=current)
    await inventory.commit(lambda: inventory.set_options(current.id, changed.options))
    log.info("metadata options modified", instance=current.id, **asdict(changed.options))
    effective = inventory.instance(current.id)
    assert effective is not None  # noqa: S101 -- checked above; only this call changes it
    return web.json_response(instance_view(inventory, effective))


@routes.get("/v1/profiles")
async def list_profiles(request: web.Request) -> web.Response:
    return web.json_response([profile_view(p) for p in request.app[INVENTORY].profiles()])


@routes.post("/v1/associations")
async def associate(request: web.Request) -> web.Response:
    data = await _body(request)
    iid, profile, inventory = (
        _text(data, "instance"),
        _text(data, "profile"),
        request.app[INVENTORY],
    )
    changed = await inventory.commit(lambda: inventory.associate(iid, profile))
    return await _associated(request, iid, changed, 201)


@routes.put("/v1/associations/{id}")
async def replace_association(request: web.Request) -> web.Response:
    iid, profile = request.match_info["id"], _text(await _body(request), "profile")
    inventory = request.app[INVENTORY]
    changed = await inventory.commit(lambda: inventory.replace_association(iid, profile))
    return await _associated(request, iid, changed, 200)


@routes.delete("/v1/associations/{id}")
async def disassociate(request: web.Request) -> web.Response:
    iid, inventory = request.match_info["id"], request.app[INVENTORY]
    request.app[APPLY](await inventory.commit(lambda: inventory.disassociate(iid)))
    log.info("instance disassociated", instance=iid)
    return web.json_response({"disassociated": iid})


async def _associated(
    request: web.Request, iid: str, changed: set[str], status: int
) -> web.Response:
    request.app[APPLY](changed)  # in effect now, whatever the upstream does
    await request.app[SETTLED](changed)  # the session exists (or has failed) before we answer
    view = _session(request, iid)
    log.info("instance associated", instance=iid, profile=view["profile"], session=view["state"])
    return web.json_response(view, status=status)


@routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.StreamResponse:
    associations = request.app[INVENTORY].associations()
    return await _listing(request, associations, lambda a: _session(request, a.instance_id))


async def _listing(
    request: web.Request, items: list[T], view: Callable[[T], dict[str, Any]]
) -> web.StreamResponse:
    """A JSON array of views, made, encoded and sent LISTING_STEP at a time, each a turn of the
    loop: a 10,000-instance listing is ~150 ms of work, which the guests must not wait for
    (DESIGN invariant 9). Each row is as of its own step."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    for start in range(0, len(items), LISTING_STEP):
        chunk = json.dumps([view(item) for item in items[start : start + LISTING_STEP]])
        await response.write((("[" if not start else ", ") + chunk[1:-1]).encode())
        await asyncio.sleep(0)  # write() returns at once while the socket takes it
    await response.write(b"[]" if not items else b"]")
    await response.write_eof()
    return response


@routes.post("/v1/sessions/{id}/rotate")
async def rotate(request: web.Request) -> web.Response:
    iid = _instance_or_404(request)
    if request.app[INVENTORY].association(iid) is None:
        raise ConflictError(f"instance {iid} has no association, so no session to rotate")
    sessions = request.app[SESSIONS]
    before = sessions.failure(iid)
    await request.app[ROTATE](iid)
    failure = sessions.failure(iid)
    if failure is not None and failure is not before:  # this very refresh failed
        return _error(502, "RotationFailed", f"{failure.code}: {failure.message}",
                      session=_session(request, iid))  # fmt: skip
    return web.json_response(_session(request, iid))


def _session(request: web.Request, iid: str) -> dict[str, Any]:
    app = request.app
    return session_view(app[INVENTORY], app[SESSIONS], iid, app[CLOCK].now(), app[DUE](iid))


def make_admin_app(inventory: Inventory, sessions: SessionCache, clock: Clock, ledger: Ledger,
                   *, apply: Apply, settled: Settled, rotate: Rotate, due: Due,
                   info: dict[str, Any], source: Source,
                   listening: Listening = list) -> web.Application:  # fmt: skip
    """The admin API over the daemon's inventory, sessions and guest budgets."""
    app = web.Application(middlewares=[json_errors], client_max_size=256 * 1024)
    app[INVENTORY], app[SESSIONS], app[CLOCK], app[LEDGER] = inventory, sessions, clock, ledger
    app[APPLY], app[SETTLED], app[ROTATE], app[DUE] = apply, settled, rotate, due
    app[INFO], app[SOURCE], app[LISTENING] = info, source, listening
    app.add_routes(routes)
    return app
