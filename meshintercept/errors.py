"""Exceptions that carry their exit status and a one-sentence, actionable message.

Core code raises these; only the CLI turns them into a stderr line and an exit code.
"""

from meshintercept.status import ExitStatus


class MeshInterceptError(Exception):
    status = ExitStatus.FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(MeshInterceptError):
    status = ExitStatus.USAGE


class NotPermitted(MeshInterceptError):
    status = ExitStatus.NOT_PERMITTED


class EnvironmentMissing(MeshInterceptError):
    status = ExitStatus.ENVIRONMENT


class ModeUnavailable(EnvironmentMissing):
    """A backend cannot run on this machine; the message says why and how to fix it."""


class NamespaceNotFound(MeshInterceptError):
    status = ExitStatus.NOT_FOUND


class Conflict(MeshInterceptError):
    status = ExitStatus.CONFLICT


class BackendFailure(MeshInterceptError):
    status = ExitStatus.FAILURE
