"""The handshake on the control connection, both sides: HELLO carries what
the destination must match, WELCOME and AUTH prove the shared key each way
(``--psk-file``) before a page moves.  With a key, the connection is sealed
right after WELCOME: AUTH and every frame after it carry a MAC (auth)."""

from hosts.constants import GRANULE, PAGE_SIZE
from migrate.errors import AuthError, Cancelled, PeerError, TransportError
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.strategies import STRATEGIES
from migrate.units import fmt_bytes

T = fr.FrameType


# -- source ---------------------------------------------------------------------------
async def introduce(chan, host, config, strategy, session: str, tls_config) -> fr.Welcome:
    """Send HELLO, check the destination's WELCOME and answer with AUTH.
    Returns the WELCOME: the destination's nonce (the data channels' JOIN
    proofs name it) and whether its RAM is allocated already."""
    key = auth.load_key(config.psk_file)
    nonce = auth.new_nonce()
    await chan.send(_hello(host, config, strategy, session, nonce))
    try:
        reply = await chan.recv()
    except TransportError as exc:
        hint = "" if tls_config else " (does the destination expect TLS, --tls-*?)"
        raise TransportError(f"no answer to HELLO: {exc}{hint}") from None
    if reply.type == T.ERROR:
        raise PeerError(reply.message, reply.code)
    if key is not None:
        if not reply.proof:
            raise AuthError("the destination has no shared key: start it with the same --psk-file")
        if not auth.check(key, reply.proof, "destination", nonce, reply.nonce, session):
            raise AuthError("the destination failed authentication: its shared key differs")
        chan.conn.seal(key, "source")
        await chan.send(fr.Auth(auth.proof(key, "source", reply.nonce, nonce, session)))
    else:
        if reply.proof:
            raise AuthError(
                "authentication failed: the destination requires a shared key; start the source with the same --psk-file"
            )
        await chan.send(fr.Auth(b""))
    return reply


def _hello(host, config, strategy, session: str, nonce: bytes) -> fr.Hello:
    return fr.Hello(
        version=PROTOCOL_VERSION,
        ram_size=host.memory.size,
        page_size=PAGE_SIZE,
        granule=GRANULE,
        mte=host.vm.mte_enabled,
        vcpus=host.vcpus.count,
        strategy=strategy.name,
        tag_format=strategy.tag_format,
        compression="zstd",
        vm_uuid=config.vm_uuid,
        channels=config.channel_count,
        session=session,
        nonce=nonce,
        postcopy=config.postcopy,
    )


# -- destination ----------------------------------------------------------------------
def hello_mismatch(hello, host, required_strategy: str | None, expect_uuid: str | None) -> str | None:
    """The first capability that does not match, as a sentence; None if all do."""
    if hello.type == T.ERROR:
        raise PeerError(f"source: {hello.message}", hello.code)
    if hello.type != T.HELLO:
        return f"expected HELLO, got {hello.type.name}"
    if hello.version != PROTOCOL_VERSION:
        return f"protocol version differs: source {hello.version}, destination {PROTOCOL_VERSION}"
    if hello.ram_size != host.memory.size:
        return f"RAM size differs: source {fmt_bytes(hello.ram_size)}, destination {fmt_bytes(host.memory.size)}"
    if hello.page_size != PAGE_SIZE:
        return f"page size differs: source {hello.page_size}, destination {PAGE_SIZE}"
    if hello.granule != GRANULE:
        return f"tag granule differs: source {hello.granule}, destination {GRANULE}"
    if hello.mte != host.vm.mte_enabled:
        return (
            f"MTE differs: source {'on' if hello.mte else 'off'}, destination {'on' if host.vm.mte_enabled else 'off'}"
        )
    if hello.vcpus != host.vcpus.count:
        return f"vCPU count differs: source {hello.vcpus}, destination {host.vcpus.count}"
    if hello.strategy not in STRATEGIES:
        return f"strategy {hello.strategy!r} is not supported here (supported: {', '.join(STRATEGIES)})"
    if required_strategy and hello.strategy != required_strategy:
        return f"strategy differs: source {hello.strategy}, destination {required_strategy}"
    wanted = STRATEGIES[hello.strategy].tag_format
    if hello.tag_format != wanted:
        return f"tag format differs: source {hello.tag_format}, destination {wanted} for {hello.strategy}"
    if hello.channels > 1 and not hello.session:
        return "several channels need a session identifier"
    if hello.compression != "zstd":
        return f"compression differs: source {hello.compression}, destination zstd"
    if expect_uuid and hello.vm_uuid != expect_uuid:
        return f"VM identity differs: source {hello.vm_uuid or '(none)'}, destination expects {expect_uuid}"
    return None


async def authenticate(chan, hello, key: bytes | None, nonce: bytes, ram_ready: bool = False) -> None:
    """WELCOME with our proof (over ``nonce``, this side's) and whether our
    RAM is allocated already, then the source's AUTH must prove the key
    before anything else is accepted."""
    mine = auth.proof(key, "destination", hello.nonce, nonce, hello.session) if key else b""
    await chan.send(fr.Welcome(PROTOCOL_VERSION, nonce, mine, ram_ready))
    if key is not None:
        chan.conn.seal(key, "destination")
    frame = await chan.recv()
    if frame.type == T.ERROR:
        raise PeerError(f"source: {frame.message}", frame.code)
    if frame.type == T.ABORT:
        raise Cancelled(f"source aborted: {frame.reason}")
    if key is not None and not (
        frame.proof and auth.check(key, frame.proof, "source", nonce, hello.nonce, hello.session)
    ):
        raise AuthError("authentication failed: the source did not prove the shared key")
