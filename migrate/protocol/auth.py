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
nonce, and the source's AUTH proves ``recover_proof`` over it."""

import hashlib
import hmac
import os

from migrate.errors import ConfigError

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
