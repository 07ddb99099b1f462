"""The access rules: which role each RPC needs, and which request fields carry keys.

Adding an RPC means declaring its role in `METHOD_ROLES` (an undeclared method
of a protected service is refused); its key-bearing fields are found from the
request message type by name (`KEY_FIELDS`, `PREFIX_FIELDS`), in nested
messages too (a Txn's conditions and ops), so batches, scans and watches are
confined without code of their own.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kvservice.audit import SecurityStats
from kvservice.auth import Principal
from kvservice.errors import Unauthenticated
from kvservice.service import to_connect_error

# Role per RPC (`<package.Service>/<Method>`). Future RPCs of DESIGN.md are
# declared already so they are confined the day they exist.
METHOD_ROLES: dict[str, str] = {
    "kvservice.v1.KVStore/Get": "read",
    "kvservice.v1.KVStore/MGet": "read",
    "kvservice.v1.KVStore/Scan": "read",
    "kvservice.v1.KVStore/Watch": "read",
    "kvservice.v1.KVStore/Set": "write",
    "kvservice.v1.KVStore/Delete": "write",
    "kvservice.v1.KVStore/Touch": "write",
    "kvservice.v1.KVStore/Increment": "write",
    "kvservice.v1.KVStore/Txn": "write",
}
# The same by URL path, so that the middleware finds a declared method's role with
# one dict lookup (`rule_for` answers for every other path).
PATH_ROLES: dict[str, str] = {f"/{name}": role for name, role in METHOD_ROLES.items()}
# Services whose every method needs one role. The replication channel
# (kvservice.v1.Replication: pushes to replicas, announcements to primaries)
# needs `replication` from the day it exists.
SERVICE_ROLES: dict[str, str] = {
    "kvservice.v1.Admin": "admin",
    "kvservice.v1.Replication": "replication",
}
# Open to anyone, like /healthz and /readyz: load balancers probe them.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Services whose undeclared methods are refused rather than passed on.
PROTECTED_SERVICES = frozenset({"kvservice.v1.KVStore", *SERVICE_ROLES})

KEY_FIELDS = frozenset({"key", "keys"})
PREFIX_FIELDS = frozenset({"prefix"})

Rule = Literal["open", "undeclared"] | str


def rule_for(path: str) -> Rule | None:
    """The role an RPC path needs, "open", "undeclared" (refuse), or None (not an RPC path)."""
    name = path[1:]
    service, sep, _ = name.partition("/")
    if not sep:
        return None
    role = METHOD_ROLES.get(name)
    if role is not None:
        return role
    if service in OPEN_SERVICES:
        return "open"
    role = SERVICE_ROLES.get(service)
    if role is not None:
        return role
    if service in PROTECTED_SERVICES:
        return "undeclared"
    return None


@dataclass(frozen=True, slots=True)
class Caller:
    """An admitted caller in the role its RPC needs: what the key check reads.

    Made once per credential and role (`credentials.Credential.caller`), not per
    request, so the middleware only has to put it in `CALLER`.
    """

    principal: Principal
    role: str  # the role the RPC needs (`rule_for`), which its keys are checked for
    # The key prefixes granted with that role; None: every key.
    prefixes: tuple[str, ...] | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        grants = self.principal.grants
        prefixes = None if grants is None else self.principal.prefixes.get(self.role, ())
        object.__setattr__(self, "prefixes", prefixes)


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "kvservice_caller", default=None
)


@dataclass(frozen=True, slots=True)
class _Step:
    kind: Literal["key", "prefix", "message"]
    name: str
    repeated: bool
    oneof: str | None
    sub: tuple[_Step, ...] = ()


_PLANS: dict[str, tuple[_Step, ...]] = {}


def key_plan(desc: Descriptor) -> tuple[_Step, ...]:
    """Where the keys of a request message type are (cached per type)."""
    plan = _PLANS.get(desc.full_name)
    if plan is None:
        _PLANS[desc.full_name] = ()  # a recursive message type ends here
        plan = _PLANS[desc.full_name] = _build_plan(desc)
    return plan


def _build_plan(desc: Descriptor) -> tuple[_Step, ...]:
    steps = []
    for field in desc.fields:
        oneof = field.containing_oneof.name if field.containing_oneof else None
        if field.type == FieldDescriptor.TYPE_STRING and field.name in KEY_FIELDS:
            steps.append(_Step("key", field.name, field.is_repeated, oneof))
        elif field.type == FieldDescriptor.TYPE_STRING and field.name in PREFIX_FIELDS:
            steps.append(_Step("prefix", field.name, field.is_repeated, oneof))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue
            sub = key_plan(field.message_type)
            if sub:
                steps.append(_Step("message", field.name, field.is_repeated, oneof, sub))
    return tuple(steps)


def _plan_of(request: Any) -> tuple[tuple[_Step, ...], str | None]:
    """A request type's key plan, and its key field if that is all it has (Get, Set...)."""
    plan = key_plan(request.DESCRIPTOR)
    if len(plan) == 1:
        step = plan[0]
        if step.kind == "key" and not step.repeated and step.oneof is None:
            return plan, step.name
    return plan, None


def keys_of(message: Message, plan: tuple[_Step, ...]) -> Iterator[tuple[str, bool]]:
    """Every (key, is_prefix) a request carries, nested messages included."""
    for step in plan:
        if step.oneof is not None and message.WhichOneof(step.oneof) != step.name:
            continue
        value: Any = getattr(message, step.name)
        values = value if step.repeated else (value,)
        if step.kind == "message":
            for sub in values:
                yield from keys_of(sub, step.sub)
        else:
            for item in values:
                yield item, step.kind == "prefix"


class AccessInterceptor:
    """Checks every key of a request against the caller's prefixes before the handler runs.

    Method roles were checked by the middleware before the body was read;
    this is the part that needs the decoded message. The unary and
    server-streaming hooks are plain functions that return the handler's own
    awaitable or stream after the check (connect-python awaits or iterates
    whatever the chain returns), so the check adds no coroutine or generator
    to every call.
    """

    def __init__(self, stats: SecurityStats) -> None:
        self.stats = stats
        # Per request message class: its key plan, and the one key field of a
        # single-key request (Get, Set, Delete...), else None.
        self._plans: dict[type, tuple[tuple[_Step, ...], str | None]] = {}

    def _check(self, request: Any, ctx: RequestContext[Any, Any]) -> None:
        caller = CALLER.get()
        if caller is None:
            # Fail closed: this interceptor only runs when authentication is on.
            raise to_connect_error(Unauthenticated("no credential"))
        allowed = caller.prefixes
        if allowed is None:
            return
        found = self._plans.get(type(request))
        if found is None:
            found = self._plans[type(request)] = _plan_of(request)
        plan, single = found
        if single is not None:
            key = getattr(request, single)
            if not key.startswith(allowed):
                self._refuse(caller, ctx, key, False)
            return
        for key, is_prefix in keys_of(request, plan):
            if not key.startswith(allowed):
                self._refuse(caller, ctx, key, is_prefix)

    def _refuse(
        self, caller: Caller, ctx: RequestContext[Any, Any], key: str, is_prefix: bool
    ) -> NoReturn:
        method = ctx.method()
        name = f"{method.service_name}/{method.name}"
        principal = caller.principal
        refusal = principal.key_refusal(key, caller.role, is_prefix=is_prefix)
        address = ctx.client_address()  # "host:port"
        self.stats.refused(
            "outside_prefix", identity=principal.name, method=name,
            client=address.rpartition(":")[0] if address else "unknown", key=key,
            message=str(refusal),
        )  # fmt: skip
        raise to_connect_error(refusal)

    def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
    ) -> Awaitable[Any]:
        self._check(request, ctx)
        return call_next(request, ctx)

    def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[Any]:
        self._check(request, ctx)
        return call_next(request, ctx)

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[Any], RequestContext[Any, Any]], Awaitable[Any]],
        request: AsyncIterator[Any],
        ctx: RequestContext[Any, Any],
    ) -> Any:
        return await call_next(self._checked(request, ctx), ctx)

    async def _checked(
        self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            self._check(request, ctx)
            yield request


__all__ = [
    "CALLER",
    "METHOD_ROLES",
    "PATH_ROLES",
    "AccessInterceptor",
    "Caller",
    "ConnectError",
    "rule_for",
]
