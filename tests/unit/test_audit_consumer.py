"""The ingest loop's handling of a batch, with fake messages and a fake writer: acknowledged
only after the write, poison dead-lettered without blocking the rest, a row the database
refuses dead-lettered on its own, and a database outage redelivered (nak), never dropped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from services.audit.adapters.store import UndecodableEvent
from services.audit.entrypoints.consumer import DEAD_LETTER_SUBJECT, EventKind, StreamIngest

pytestmark = pytest.mark.unit


@dataclass
class FakeMessage:
    data: bytes
    subject: str = "crm.events.t.s.contacts.INSERT"
    outcome: str = ""
    headers: dict[str, str] | None = None

    async def ack(self) -> None:
        self.outcome = "ack"

    async def nak(self, delay: float = 0) -> None:
        self.outcome = "nak"

    async def term(self) -> None:
        self.outcome = "term"


@dataclass
class FakeJetStream:
    published: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.published.append((subject, payload, headers))


def decode(payload: bytes) -> bytes:
    if payload.startswith(b"poison"):
        raise UndecodableEvent("not an event")
    return payload


@dataclass
class FakeWriter:
    fail_with: BaseException | None = None
    refuse: bytes = b""
    written: list[bytes] = field(default_factory=list)

    async def __call__(self, pool: Any, rows: Sequence[bytes]) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        if self.refuse in rows and self.refuse:
            raise asyncpg.DataError("invalid input")
        self.written += rows
        return len(rows)


def ingest(writer: FakeWriter) -> StreamIngest[bytes]:
    kind: EventKind[bytes] = EventKind("changes", "crm.events.>", "", decode, writer)
    return StreamIngest(kind, lambda: None, lambda: None, "audit", 10)  # type: ignore[arg-type,return-value]


async def test_good_messages_are_acknowledged_after_the_write_and_poison_is_dead_lettered() -> None:
    writer, js = FakeWriter(), FakeJetStream()
    messages = [FakeMessage(b"a"), FakeMessage(b"poison!"), FakeMessage(b"b")]
    await ingest(writer).handle(js, messages)  # type: ignore[arg-type]
    assert [m.outcome for m in messages] == ["ack", "term", "ack"]
    assert writer.written == [b"a", b"b"]
    ((subject, payload, headers),) = js.published
    assert subject == DEAD_LETTER_SUBJECT and payload == b"poison!"
    assert headers["Crm-Dead-Letter-Reason"] == "not an event"
    assert headers["Crm-Original-Subject"] == "crm.events.t.s.contacts.INSERT"


async def test_a_row_the_database_refuses_is_dead_lettered_alone() -> None:
    writer, js = FakeWriter(refuse=b"bad"), FakeJetStream()
    messages = [FakeMessage(b"a"), FakeMessage(b"bad"), FakeMessage(b"b")]
    await ingest(writer).handle(js, messages)  # type: ignore[arg-type]
    assert [m.outcome for m in messages] == ["ack", "term", "ack"]
    assert writer.written == [b"a", b"b"]
    assert [p[1] for p in js.published] == [b"bad"]


async def test_a_database_outage_redelivers_the_whole_batch() -> None:
    writer, js = FakeWriter(fail_with=OSError("connection refused")), FakeJetStream()
    messages = [FakeMessage(b"a"), FakeMessage(b"b")]
    await ingest(writer).handle(js, messages)  # type: ignore[arg-type]
    assert [m.outcome for m in messages] == ["nak", "nak"]
    assert js.published == []
