"""Small conversions between database values and protobuf well-known types."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A naive value is taken as UTC. Built from the offset to the epoch: Timestamp.FromDatetime
    costs three times as much, and list pages convert a few per row."""
    if value is None:
        return None
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)


def struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if values:
        message.update(values)
    return message


def from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message))


def etag(version: int) -> str:
    return f'W/"{version}"'
