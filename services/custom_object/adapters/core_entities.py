"""Existence checks for records of core entity types (account, contact, lead, deal, activity),
which live in the core-entity service of the same shard.

The custom-object service never reads core tables; it asks the core-entity service over gRPC with
the caller's tenant and request id and the internal credential, exactly as the gateway would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc

from crm.v1 import core_entity_pb2, core_entity_pb2_grpc
from shared import context as callctx
from shared.errors import Unavailable
from shared.grpc_server import insecure_channel, internal_metadata


class CoreRecords(Protocol):
    """Answers which of some core records do not exist in the caller's tenant."""

    async def missing(self, object_type: str, ids: Iterable[str]) -> set[str]: ...


class CoreEntityClient:
    """CoreRecords over the same shard's core-entity service (one pooled channel)."""

    def __init__(self, address: str, internal_token: str, timeout: float = 5.0) -> None:
        self._address = address
        self._token = internal_token
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    def _getter(self, object_type: str) -> Callable[[str], Awaitable[Any]]:
        if self._channel is None:
            # Created lazily inside the running loop (a channel made before it fails every call).
            self._channel = insecure_channel(self._address)
        channel = self._channel
        metadata = self._metadata()
        timeout = self._timeout
        getters: dict[str, Callable[[str], Awaitable[Any]]] = {
            "account": lambda i: core_entity_pb2_grpc.AccountServiceStub(channel).GetAccount(
                core_entity_pb2.GetAccountRequest(id=i), metadata=metadata, timeout=timeout
            ),
            "contact": lambda i: core_entity_pb2_grpc.ContactServiceStub(channel).GetContact(
                core_entity_pb2.GetContactRequest(id=i), metadata=metadata, timeout=timeout
            ),
            "lead": lambda i: core_entity_pb2_grpc.LeadServiceStub(channel).GetLead(
                core_entity_pb2.GetLeadRequest(id=i), metadata=metadata, timeout=timeout
            ),
            "deal": lambda i: core_entity_pb2_grpc.DealServiceStub(channel).GetDeal(
                core_entity_pb2.GetDealRequest(id=i), metadata=metadata, timeout=timeout
            ),
            "activity": lambda i: core_entity_pb2_grpc.ActivityServiceStub(channel).GetActivity(
                core_entity_pb2.GetActivityRequest(id=i), metadata=metadata, timeout=timeout
            ),
        }
        return getters[object_type]

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        call = callctx.current_call()
        pairs = [
            (callctx.TENANT_ID_KEY, call.tenant_id or ""),
            (callctx.REQUEST_ID_KEY, call.request_id),
            (callctx.USER_ID_KEY, call.user_id or ""),
        ]
        if call.shard_epoch is not None:
            pairs.append((callctx.SHARD_EPOCH_KEY, str(call.shard_epoch)))
        return internal_metadata(self._token, [(k, v) for k, v in pairs if v])

    async def missing(self, object_type: str, ids: Iterable[str]) -> set[str]:
        if not self._address:
            raise Unavailable("the core-entity service of this shard is not configured")
        get = self._getter(object_type)
        absent: set[str] = set()
        for record_id in sorted(set(ids)):
            try:
                await get(record_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    absent.add(record_id)
                elif exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(
                        f"the core-entity service did not answer ({exc.code().name}); retry"
                    ) from exc
                else:
                    raise Unavailable(f"cannot check the {object_type} record: {exc.code().name}") from exc
        return absent

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
