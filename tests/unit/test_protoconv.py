"""Conversions to protobuf well-known types."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from shared import protoconv

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 11, 25, 19, 30, 48, 123456, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        dt.datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=dt.UTC),  # before the epoch
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=5))),
    ],
)
def test_timestamps_equal_the_library_conversion(value: dt.datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value.astimezone(dt.UTC))
    converted = protoconv.timestamp(value)
    assert converted == expected
    assert converted is not None and protoconv.from_timestamp(converted) == value


def test_a_naive_timestamp_is_taken_as_utc_and_none_stays_none() -> None:
    naive = dt.datetime(2026, 1, 2, 3, 4, 5, 6)
    assert protoconv.timestamp(naive) == protoconv.timestamp(naive.replace(tzinfo=dt.UTC))
    assert protoconv.timestamp(None) is None
