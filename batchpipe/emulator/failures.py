"""The one exception the emulator's state raises to mean "answer with this API error"."""

from __future__ import annotations


class ApiFailure(Exception):
    """An API error response: HTTP status, the envelope's ``error.type`` and its message."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def not_found(batch_id: str) -> ApiFailure:
    """The 404 for an id the emulator does not know (never created, or deleted)."""
    return ApiFailure(404, "not_found_error", f"message batch {batch_id!r} not found")


def bad_request(message: str) -> ApiFailure:
    """A 400 invalid_request_error."""
    return ApiFailure(400, "invalid_request_error", message)
