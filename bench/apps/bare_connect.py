"""The floor of connect-python: the generated KVStore app over a plain dict.

Stock connect-python codecs on purpose (kvservice.codec is not imported), so
this is what anyone gets from the library before adding a storage engine.
Only Get does real work; the bench never calls Set or Delete here, and the
data-model RPCs answer unimplemented (the generated app needs every method).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from bench.dataset import HOT_KEY, HOT_VALUE
from kvservice.v1.kv_connect import KVStore, KVStoreASGIApplication
from kvservice.v1.kv_pb2 import (
    DeleteRequest,
    DeleteResponse,
    GetRequest,
    GetResponse,
    SetRequest,
    SetResponse,
    WatchRequest,
    WatchResponse,
)

# The same key and 100-byte value the kvservice Get case reads.
DATA: dict[str, tuple[bytes, int]] = {HOT_KEY: (HOT_VALUE, 1)}


class DictKVStore(KVStore):
    """A KVStore whose Get is one dict lookup (the other RPCs answer unimplemented)."""

    async def get(self, request: GetRequest, ctx: RequestContext[Any, Any]) -> GetResponse:
        found = DATA.get(request.key)
        if found is None:
            return GetResponse()
        return GetResponse(found=True, value=found[0], revision=found[1])

    async def set(self, request: SetRequest, ctx: RequestContext[Any, Any]) -> SetResponse:
        DATA[request.key] = (request.value, 1)
        return SetResponse(revision=1)

    async def delete(self, request: DeleteRequest, ctx: RequestContext[Any, Any]) -> DeleteResponse:
        return DeleteResponse(deleted=DATA.pop(request.key, None) is not None, revision=1)

    async def _unimplemented(self, request: object, ctx: RequestContext[Any, Any]) -> NoReturn:
        raise ConnectError(Code.UNIMPLEMENTED, "the bare app serves Get, Set and Delete only")

    touch = increment = m_get = txn = scan = _unimplemented

    async def watch(
        self, request: WatchRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[WatchResponse]:
        await self._unimplemented(request, ctx)
        yield WatchResponse()  # never reached: makes this an async generator


app = KVStoreASGIApplication(DictKVStore())
