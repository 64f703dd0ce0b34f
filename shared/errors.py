"""Domain errors raised by the core and the one table that maps them to gRPC statuses.

Handlers raise these; the server interceptor turns them into a `google.rpc.Status` with
`BadRequest` field violations or `ErrorInfo`, so every service answers bad input the same way.
Database errors are translated by SQLSTATE; anything else becomes a generic INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "crm.platform"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path (e.g. `tenant.subdomain`) and the rule it breaks."""

    field: str
    description: str


class CrmError(Exception):
    """Base of every error a handler may raise on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        return [info]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())


class InvalidArgument(CrmError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid argument: {summary}")

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed, *super().details()]


def invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


class NotFound(CrmError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(CrmError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(CrmError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class PermissionDenied(CrmError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(CrmError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class Aborted(CrmError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class ResourceExhausted(CrmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        if self.retry_after is not None:
            retry = any_pb2.Any()
            retry_info = error_details_pb2.RetryInfo()
            retry_info.retry_delay.FromNanoseconds(int(self.retry_after * 1e9))
            retry.Pack(retry_info)
            details.append(retry)
        return details


class Unavailable(CrmError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


# SQLSTATE classes that mean "the client sent something the schema refuses", not a bug.
_SQLSTATE_ERRORS: dict[str, type[CrmError]] = {
    "23505": AlreadyExists,  # unique_violation
    "23514": FailedPrecondition,  # check_violation: a rule the validator should have caught
    "23503": NotFound,  # foreign_key_violation: the referenced record is not there
    "23502": FailedPrecondition,  # not_null_violation
    "40001": Aborted,  # serialization_failure: retry
    "40P01": Aborted,  # deadlock_detected: retry
}


def translate_database_error(exc: BaseException) -> CrmError | None:
    """Maps a driver error to a domain error by SQLSTATE, or None when it is not the client's."""
    current: BaseException | None = exc
    while current is not None:
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate in _SQLSTATE_ERRORS:
            constraint = getattr(current, "constraint_name", None) or ""
            detail = f" ({constraint})" if constraint else ""
            return _SQLSTATE_ERRORS[sqlstate](
                f"the database refused the change{detail}", reason=f"SQLSTATE_{sqlstate}"
            )
        current = getattr(current, "orig", None) or current.__cause__
    return None


def error_reason(status: status_pb2.Status) -> str:
    """The ErrorInfo reason carried by a status, or ''."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def internal_status(message: str = "internal error") -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)
