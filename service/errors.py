"""Typed domain errors; the API maps them to HTTP status codes with the message as ``detail``."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400


class BadRequest(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    """A state conflict: an invalid transition, a duplicate name, a run already active (HTTP 409)."""

    status_code = 409
