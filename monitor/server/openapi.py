"""The OpenAPI schema as the server behaves: invalid requests are 400s with an OpenAI-style error
body, where FastAPI's generated schema says 422 with its own validation-error shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "description": "An OpenAI-style error.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error"]},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "The field at fault, if any."},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
INVALID_REQUEST = {
    "description": "Invalid request",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def api_schema(app: FastAPI) -> dict[str, Any]:
    """`app.openapi()` with each operation's 422 replaced by a 400 carrying the error body (done
    once, in FastAPI's cached schema)."""
    schema = app.openapi()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" in components:
        return schema
    components["ErrorResponse"] = ERROR_SCHEMA
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = INVALID_REQUEST
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema
