"""Migration errors.  Each maps to an error frame on the wire (``code``) so the
peer always learns why, and to a one-line message for the user."""


class MigrationError(Exception):
    code = "error"
    status = "failed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProtocolError(MigrationError):
    """The peer sent something malformed, out of range or out of order."""

    code = "protocol"


class TamperedFrame(ProtocolError):
    """A frame on a connection sealed with the shared key failed its MAC (or
    came without one): it was altered, dropped, replayed or reordered on
    the way."""

    code = "tampered"


class GuestFaulted(MigrationError):
    """Every page arrived, but the guest took tag check faults on the way
    (pages went live before their tags): not a clean migration."""

    code = "guest-faulted"
    status = "guest-faulted"


class HandshakeMismatch(MigrationError):
    """Source and destination cannot migrate this guest (sizes, versions...)."""

    code = "mismatch"


class PeerError(MigrationError):
    """The peer reported an error (its message is ours)."""

    code = "peer"

    def __init__(self, message: str, remote_code: str = "error"):
        super().__init__(message)
        self.remote_code = remote_code


class TransportError(MigrationError):
    """The connection broke, or the peer stopped answering."""

    code = "transport"


class PeerTimeout(TransportError):
    code = "timeout"


class AuthError(MigrationError):
    """The peer could not prove it holds the shared key."""

    code = "auth"


class InDoubt(MigrationError):
    """GO was sent and never confirmed: the destination holds the guest."""

    code = "in-doubt"


class DestinationGone(TransportError):
    """Nothing listens where the destination was: its VMM is gone."""

    code = "gone"


class ValidationFailed(MigrationError):
    """The destination's memory, tags or vCPU state differ from the source's."""

    code = "validation"


class Cancelled(MigrationError):
    """The user cancelled (Ctrl-C / SIGTERM)."""

    code = "cancelled"
    status = "cancelled"


class ConfigError(MigrationError):
    """Bad command line or scenario."""

    code = "config"


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
