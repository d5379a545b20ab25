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


class Unprocessable(ServiceError):
    """Well-formed, but not something this deployment can do: e.g. a Slurm partition that does not exist
    (HTTP 422)."""

    status_code = 422


class Unavailable(ServiceError):
    """A system the request depends on could not be asked (the Slurm controller is unreachable; HTTP 503)."""

    status_code = 503
