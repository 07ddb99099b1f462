"""The fast JSON codec agrees with protobuf's json_format, and bad input is invalid_argument."""

from __future__ import annotations

import json

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from kvservice.codec import CheckedProtoCodec, CompactJSONCodec
from kvservice.health.v1.health_pb2 import HealthCheckResponse
from kvservice.v1.kv_pb2 import GetResponse, SetRequest

codec = CompactJSONCodec()
responses = st.builds(
    GetResponse,
    found=st.booleans(),
    value=st.binary(max_size=64),
    revision=st.integers(min_value=0, max_value=2**64 - 1),
)
requests = st.builds(SetRequest, key=st.text(max_size=30), value=st.binary(max_size=64))


def reference(message: object) -> bytes:
    as_dict = json_format.MessageToDict(message)  # type: ignore[arg-type]
    return json.dumps(as_dict, separators=(",", ":")).encode()


@given(responses)
def test_encode_matches_json_format(message: GetResponse) -> None:
    assert codec.encode(message) == reference(message)


def test_non_flat_messages_use_json_format() -> None:
    """Enums are not on the fast path: they still come out by name."""
    assert codec.encode(HealthCheckResponse(status=1)) == b'{"status":"SERVING"}'


@given(requests)
def test_decode_round_trips_json_format_output(message: SetRequest) -> None:
    for text in (json_format.MessageToJson(message), codec.encode(message)):
        assert (
            codec.decode(text.encode() if isinstance(text, str) else text, SetRequest()) == message
        )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"key":"k","value":"aGk"}', SetRequest(key="k", value=b"hi")),  # unpadded base64
        (b'{"key":"k","value":"-_8="}', SetRequest(key="k", value=b"\xfb\xff")),  # URL-safe
        (b'{"key":"k","unknownField":[1,2]}', SetRequest(key="k")),  # unknown: ignored
        (b'{"key":null}', SetRequest()),  # null: the default
    ],
)
def test_lenient_inputs_decode_like_json_format(body: bytes, expected: SetRequest) -> None:
    assert codec.decode(body, SetRequest()) == expected


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[]", b'"key"', b'{"key":1}', b'{"key":"k","value":5}', b"\xff"]
)
def test_malformed_json_is_invalid_argument(body: bytes) -> None:
    with pytest.raises(ConnectError) as info:
        codec.decode(body, SetRequest())
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message.startswith("malformed JSON request")


def test_malformed_protobuf_is_invalid_argument() -> None:
    with pytest.raises(ConnectError) as info:
        CheckedProtoCodec().decode(b"\x0a\x05ab", SetRequest())  # length 5, 2 bytes present
    assert info.value.code == Code.INVALID_ARGUMENT


def test_deeply_nested_json_is_invalid_argument() -> None:
    """Nesting deep enough to exhaust the recursion limit is the client's fault."""
    with pytest.raises(ConnectError) as info:
        codec.decode(b"[" * 200_000, SetRequest())
    assert info.value.code == Code.INVALID_ARGUMENT
