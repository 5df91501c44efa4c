"""One error tree for mlchat. Each error names the gRPC status a servicer answers with.

Messages say what was wrong and how to fix it; they are shown to clients as they are.
"""

from __future__ import annotations


class MlchatError(Exception):
    """Base of every error mlchat raises on purpose."""

    grpc_status = "INTERNAL"
    retriable = False


class InvalidArgument(MlchatError):
    grpc_status = "INVALID_ARGUMENT"


class Unauthenticated(MlchatError):
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(MlchatError):
    grpc_status = "PERMISSION_DENIED"


class NotFound(MlchatError):
    grpc_status = "NOT_FOUND"


class AlreadyExists(MlchatError):
    grpc_status = "ALREADY_EXISTS"


class FailedPrecondition(MlchatError):
    """The request is valid but the state it acts on does not allow it (see the message for what)."""

    grpc_status = "FAILED_PRECONDITION"


class OutOfRange(MlchatError):
    grpc_status = "OUT_OF_RANGE"


class ResourceExhausted(MlchatError):
    grpc_status = "RESOURCE_EXHAUSTED"
    retriable = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # sent as the `retry-after-ms` trailer


class Unavailable(MlchatError):
    """This region cannot serve the call now (storage down, not caught up); another may."""

    grpc_status = "UNAVAILABLE"
    retriable = True


class Relayed(MlchatError):
    """An error another region answered a forwarded call with, passed on with its status."""

    def __init__(self, grpc_status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = grpc_status
