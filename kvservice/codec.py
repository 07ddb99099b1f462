"""Connect codecs for the server: fast compact JSON, and bad input as invalid_argument.

connect-python 0.9 picks codecs from one module-level registry and offers no
per-application setting, so `install()` replaces its entries. Ours differ from
the stock ones in ways that users see:
- JSON replies are compact; the stock codec pretty-prints with indent=2.
- Flat messages (every field a singular string, bytes, bool or integer, as in
  every KVStore message) are converted by a direct mapping instead of
  protobuf's generic json_format walk, which is most of the cost of a small
  request. Anything else, and any input the fast path does not accept as is,
  goes through json_format, so results and error messages stay protobuf's.
  (One difference: a key repeated in a JSON object keeps its last value, as
  JSON.parse does, where json_format refuses the object.)
- A body that does not parse is the client's fault: `invalid_argument` with
  the parser's reason, not `unknown` with an exception string.
Unknown JSON fields are ignored, as connect-go does, so older servers accept
requests from newer clients.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from connectrpc import _codec
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)
F = FieldDescriptor
_INT64 = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64}
_INT32 = {F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_SINT32, F.TYPE_FIXED32, F.TYPE_SFIXED32}
_FLAT = _INT64 | _INT32 | {F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_BOOL}
_INVALID = object()


def _is_flat(descriptor: Descriptor) -> bool:
    return all(f.type in _FLAT and not f.is_repeated and _alone(f) for f in descriptor.fields)


def _alone(field: FieldDescriptor) -> bool:
    """Not in a real oneof. A proto3 `optional` field sits in a synthetic oneof of its
    own (named `_<field>`, protoc's rule): setting it is all its presence takes."""
    oneof = field.containing_oneof
    return oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{field.name}")


def _to_json_value(field: FieldDescriptor) -> Callable[[Any], Any]:
    if field.type == F.TYPE_BYTES:
        return lambda v: base64.b64encode(v).decode("ascii")
    if field.type in _INT64:
        return str  # proto3 JSON writes 64-bit integers as strings
    return lambda v: v


def _from_json_value(field: FieldDescriptor) -> Callable[[Any], Any]:
    """Convert a JSON value for `field`, or return _INVALID to defer to json_format."""
    if field.type == F.TYPE_STRING:
        return lambda v: v if type(v) is str else _INVALID
    if field.type == F.TYPE_BOOL:
        return lambda v: v if type(v) is bool else _INVALID
    if field.type == F.TYPE_BYTES:

        def from_base64(v: Any) -> Any:
            if type(v) is not str:
                return _INVALID
            try:
                return base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                return _INVALID  # URL-safe or unpadded base64: json_format accepts those

        return from_base64
    return lambda v: v if type(v) is int else _INVALID  # strings and floats: json_format


class _FlatPlan:
    """Per-message-type field tables for the fast JSON path."""

    def __init__(self, descriptor: Descriptor) -> None:
        self.encoders = {f.name: (f.json_name, _to_json_value(f)) for f in descriptor.fields}
        self.decoders: dict[str, tuple[str, Callable[[Any], Any]]] = {}
        for f in descriptor.fields:
            self.decoders[f.name] = self.decoders[f.json_name] = (f.name, _from_json_value(f))


class CompactJSONCodec:
    def __init__(self) -> None:
        self._plans: dict[Any, _FlatPlan | None] = {}  # by message Descriptor

    def name(self) -> str:
        return "json"

    def _plan(self, descriptor: Any) -> _FlatPlan | None:
        try:
            return self._plans[descriptor]
        except KeyError:
            plan = _FlatPlan(descriptor) if _is_flat(descriptor) else None
            self._plans[descriptor] = plan
            return plan

    def encode(self, message: Message) -> bytes:
        plan = self._plan(message.DESCRIPTOR)
        if plan is None:
            as_dict = json_format.MessageToDict(message)
        else:
            encoders = plan.encoders
            as_dict = {}
            for field, value in message.ListFields():
                json_name, convert = encoders[field.name]
                as_dict[json_name] = convert(value)
        return json.dumps(as_dict, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message: M) -> M:
        plan = self._plan(message.DESCRIPTOR)
        if plan is not None and self._decode_flat(plan, data, message):
            return message
        message.Clear()
        try:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed JSON request: {exc}") from None
        return message

    @staticmethod
    def _decode_flat(plan: _FlatPlan, data: bytes | bytearray, message: Message) -> bool:
        """Fill `message` from simple JSON; False when json_format must decide."""
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        except RecursionError:  # deeply nested arrays or objects
            raise ConnectError(
                Code.INVALID_ARGUMENT, "malformed JSON request: nested too deeply"
            ) from None
        if type(obj) is not dict:
            # json_format lets `[]` or `"x"` through as an empty message; a client
            # sending that has a bug worth hearing about.
            raise ConnectError(
                Code.INVALID_ARGUMENT,
                f"malformed JSON request: expected a JSON object, got {type(obj).__name__}",
            )
        values = {}
        for key, raw in obj.items():
            entry = plan.decoders.get(key)
            if entry is None or raw is None:
                continue  # unknown field (ignored) or null (the default)
            name, convert = entry
            value = convert(raw)
            if value is _INVALID or name in values:
                return False
            values[name] = value
        try:
            for name, value in values.items():
                setattr(message, name, value)
        except (TypeError, ValueError):  # e.g. an integer out of range
            message.Clear()
            return False
        return True


class CheckedProtoCodec:
    def name(self) -> str:
        return "proto"

    def encode(self, message: Message) -> bytes:
        return message.SerializeToString()

    def decode(self, data: bytes | bytearray, message: M) -> M:
        try:
            message.ParseFromString(bytes(data))
        except DecodeError as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"malformed protobuf request: {exc}"
            ) from None
        return message


def install() -> None:
    """Register our codecs for every server in this process (idempotent)."""
    json_codec = CompactJSONCodec()
    _codec._codecs[_codec.CODEC_NAME_JSON] = json_codec
    _codec._codecs[_codec.CODEC_NAME_JSON_CHARSET_UTF8] = json_codec
    _codec._codecs[_codec.CODEC_NAME_PROTO] = CheckedProtoCodec()
