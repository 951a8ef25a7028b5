"""Reading and digesting JSON with integers past 64 bits, which orjson alone reads as floats."""

from __future__ import annotations

import json

import orjson
import pytest

from ingest import safejson
from ingest.providers.base import canonical_digest

BIG = [2**64, 2**64 + 1, -(2**63) - 1, 10**30, -(10**25)]


@pytest.mark.parametrize("number", BIG)
def test_integers_past_64_bits_are_read_exact(number: int) -> None:
    text = json.dumps({"id": number, "nested": [{"n": number}], "small": 7})
    assert isinstance(orjson.loads(text)["id"], float)  # what this guards against
    value = safejson.loads(text)
    assert value == {"id": number, "nested": [{"n": number}], "small": 7}
    assert isinstance(value["id"], int)


@pytest.mark.parametrize("text", [
    '{"id": 9223372036854775807, "u": 18446744073709551615, "neg": -9223372036854775808}',
    '{"phone": "12345678901234567890123", "ratio": 0.1, "big": 1.5e300, "name": "\\u00e9"}',
    '{"a": [1, 2, {"b": null, "c": true}], "a": "last wins"}',
])
def test_everything_else_reads_as_orjson_reads_it(text: str) -> None:
    assert safejson.loads(text) == orjson.loads(text)


def test_invalid_json_raises_orjsons_error() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        safejson.loads('{"id": 12345678901234567890,')
    with pytest.raises(orjson.JSONDecodeError):
        safejson.loads('{"id": NaN}')  # the standard library alone would accept it


def test_the_digest_of_ordinary_data_is_the_one_stored_dedup_keys_hold() -> None:
    assert canonical_digest({"b": 1, "a": [1, {"z": 1, "y": 2.5}], "c": "é"}) \
        == "7692d86351b51017a8919aa6bed8c5af"


def test_the_digest_takes_integers_past_64_bits_and_tells_them_apart() -> None:
    first = canonical_digest({"id": 2**64 + 1, "name": "x"})
    assert first == canonical_digest({"name": "x", "id": 2**64 + 1})  # key order does not count
    assert first != canonical_digest({"id": 2**64 + 2, "name": "x"})
