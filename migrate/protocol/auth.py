"""Who may migrate: a shared key (--psk-file) proves both sides with an HMAC
challenge/response before any guest byte is read or written.

Each side sends a fresh random nonce (HELLO, WELCOME).  The destination
proves itself in WELCOME, the source in AUTH, each with HMAC-SHA256 over a
role label, both nonces and the session; a data connection proves itself in
JOIN the same way.  Nothing is trusted before the proofs check out, and the
comparisons are constant-time.

Every proof names a fresh nonce of the side that checks it, so none can be
replayed on another connection: WELCOME's the source's (HELLO), AUTH's and
JOIN's the destination's (WELCOME).  A recovery connection has its own
challenge: the destination answers RECOVER with a WELCOME carrying a new
nonce, and the source's AUTH proves ``recover_proof`` over it.

After the proofs' challenge, every frame of every connection is sealed: a
MAC on each frame (FrameMac), under keys derived from the shared key and
the connection's transcript (every byte of its frames before the seal:
HELLO and WELCOME, JOIN and WELCOME, or RECOVER and WELCOME, nonces and
capabilities included).  A transcript is fresh on every connection, each
direction has its own key, and the MAC covers a sequence number, so a
frame cannot be altered, dropped, replayed, reordered, reflected back or
moved to another connection without the receiver noticing at that frame.
Data channels derive from the control connection's stream secret, which
binds them to that migration.  The stream is authenticated, not
encrypted: the standard library has no cipher; --tls encrypts."""

import hashlib
import hmac
import os

from migrate.errors import ConfigError
from migrate.protocol.frames import MAC_SIZE

NONCE_BYTES = 32
MIN_KEY_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def load_key(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the key in {path} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            f"(e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
        )
    return key


def proof(key: bytes, role: str, *parts) -> bytes:
    mac = hmac.new(key, role.encode(), hashlib.sha256)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        mac.update(len(b).to_bytes(4, "little") + b)
    return mac.digest()


def check(key: bytes, given: bytes, role: str, *parts) -> bool:
    return hmac.compare_digest(given, proof(key, role, *parts))


def recover_proof(key: bytes, session: str, decision: str, nonce: bytes) -> bytes:
    """A recovery connection's AUTH: the RECOVER decision for ``session``,
    bound to ``nonce``, the destination's challenge on that connection."""
    return proof(key, "recover", session, decision, nonce)


def check_recover(key: bytes, given: bytes, session: str, decision: str, nonce: bytes) -> bool:
    return check(key, given, "recover", session, decision, nonce)


# -- the sealed stream ---------------------------------------------------------------
def stream_secret(secret: bytes, transcript: bytes) -> bytes:
    """A connection's secret: ``secret`` (the shared key, or for a data
    channel its control connection's stream secret) bound to the digest of
    this connection's transcript."""
    return hmac.digest(secret, b"mte-migrate stream\0" + transcript, "sha256")


def direction_keys(stream: bytes, side: str) -> tuple[bytes, bytes]:
    """(sending key, receiving key) of ``side`` ("source" or "destination"):
    one key per direction, so a frame reflected back to its sender fails."""
    to_dest = hmac.digest(stream, b"source to destination", "sha256")
    to_source = hmac.digest(stream, b"destination to source", "sha256")
    return (to_dest, to_source) if side == "source" else (to_source, to_dest)


class FrameMac:
    """One direction of a sealed connection: HMAC-SHA-256, cut to MAC_SIZE
    bytes, over the frame's sequence number on this connection, its header
    (less the CRC field), meta and payload.  Both ends count frames, so the
    number never travels."""

    def __init__(self, key: bytes):
        self._start = hmac.new(key, digestmod="sha256")  # OpenSSL's HMAC: updates release the GIL
        self.seq = 0

    def tag(self, head, meta, payload) -> bytes:
        mac = self._start.copy()
        mac.update(self.seq.to_bytes(8, "little"))
        mac.update(head[:12])
        mac.update(meta)
        for p in payload:
            mac.update(p)
        self.seq += 1
        return mac.digest()[:MAC_SIZE]

    def check(self, head, meta, payload, given) -> bool:
        return hmac.compare_digest(self.tag(head, meta, (payload,)), bytes(given))
