"""A JSON Schema that exercises what constrained output must follow (a bounded string, an
integer range, an enum, a nested object, an array), shared by the engine's and the
frontend's tests, and the check that a document follows it (by hand: no jsonschema here)."""

from __future__ import annotations

from typing import Any

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


def check_person(value: object) -> None:
    """`value` (a parsed document) follows PERSON, rule by rule."""
    assert isinstance(value, dict) and set(value) == set(PERSON["properties"]), value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert value["role"] in ("admin", "user", "guest")
    assert set(value["address"]) == {"city"} and isinstance(value["address"]["city"], str)
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(tag, str) and len(tag) <= 8 for tag in value["tags"])
