"""Tests for greylist.core.record: the versioned text form of records."""

import pytest
from hypothesis import given, strategies as st

from greylist.core.record import STATES, Record, decode, encode

T = 1_700_000_000
MAX_19_DIGITS = 10**19 - 1


@pytest.mark.parametrize("record, text", [
    pytest.param(Record(T, T + 300, 2, "pending"), b"1:1700000000:1700000300:2:pending",
                 id="pending"),
    pytest.param(Record(T, T + 300, 3, "passed"), b"1:1700000000:1700000300:3:passed",
                 id="passed"),
    pytest.param(Record(0, 0, 0, "pending"), b"1:0:0:0:pending", id="zeros"),
    pytest.param(Record(T, T, 1, "sender"), b"1:1700000000:1700000000:1:sender",
                 id="sender-entry"),
    pytest.param(Record(T, T + 7200, 5, "client"), b"1:1700000000:1700007200:5:client",
                 id="client-entry"),
    pytest.param(Record(MAX_19_DIGITS, MAX_19_DIGITS, MAX_19_DIGITS, "passed"),
                 b"1:9999999999999999999:9999999999999999999:9999999999999999999:passed",
                 id="nineteen-digits"),
])
def test_encode_and_decode(record, text):
    assert encode(record) == text
    assert decode(text) == record


@pytest.mark.parametrize("text", [
    pytest.param(b"", id="empty"),
    pytest.param(b"2:1700000000:1700000300:2:pending", id="version-2"),
    pytest.param(b"0:1700000000:1700000300:2:pending", id="version-0"),
    pytest.param(b"01:1700000000:1700000300:2:pending", id="version-01"),
    pytest.param(b":1700000000:1700000300:2:pending", id="version-empty"),
    pytest.param(b"1700000000:1700000300:2:pending", id="version-missing"),
    pytest.param(b"1:1700000000:1700000300:pending", id="four-fields"),
    pytest.param(b"1:1700000000:1700000300:2:pending:x", id="six-fields"),
    pytest.param(b"1:1700000000:1700000300:2:pending:", id="trailing-colon"),
    pytest.param(b"1:1700000000:1700000300:2:", id="state-empty"),
    pytest.param(b"1:1700000000:1700000300:2:expired", id="state-unknown"),
    pytest.param(b"1:1700000000:1700000300:2:PENDING", id="state-uppercase"),
    pytest.param(b"1:1700000000:1700000300:2:pending\0", id="state-trailing-nul"),
    pytest.param(b"1:1700000000:1700000300:2:pending\n", id="state-trailing-newline"),
    pytest.param(b"1::1700000300:2:pending", id="number-empty"),
    pytest.param(b"1:17000000a0:1700000300:2:pending", id="non-digit"),
    pytest.param(b"1:0x10:1700000300:2:pending", id="hex"),
    pytest.param(b"1:1.5:1700000300:2:pending", id="decimal-point"),
    pytest.param(b"1:+1700000000:1700000300:2:pending", id="plus-sign"),
    pytest.param(b"1:1700000000:-1:2:pending", id="minus-sign"),
    pytest.param(b"1: 1700000000:1700000300:2:pending", id="leading-space"),
    pytest.param(b"1:1700000000:1700000300 :2:pending", id="trailing-space"),
    pytest.param(b"1:1700000000:1700000300:\t2:pending", id="tab"),
    pytest.param(b"1:1_700_000_000:1700000300:2:pending", id="underscores"),
    pytest.param("1:1700000000:1700000300:\u0662:pending".encode(), id="arabic-indic-digit"),
    pytest.param(b"1:" + b"1" * 20 + b":1700000300:2:pending", id="first-20-digits"),
    pytest.param(b"1:1700000000:" + b"0" * 20 + b":2:pending", id="last-20-digits"),
    pytest.param(b"1:1700000000:1700000300:" + b"9" * 20 + b":pending", id="count-20-digits"),
])
def test_decode_rejects(text):
    assert decode(text) is None


_numbers = st.integers(min_value=0, max_value=MAX_19_DIGITS)
_records = st.builds(Record, _numbers, _numbers, _numbers, st.sampled_from(STATES))


@given(_records)
def test_round_trip(record):
    text = encode(record)
    assert decode(text) == record
    # A Postfix lookup of an empty value is an error; NUL ends the value.
    assert text and b"\0" not in text


@given(st.binary())
def test_decode_never_raises(text):
    result = decode(text)
    assert result is None or isinstance(result, Record)
