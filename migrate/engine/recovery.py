"""The in-doubt window, in one place: GO was sent and RESUMED not heard, so
neither side can know what the other did.

Source (``SourceRecovery``): it never resumes a guest it has given up.  It
says RECOVER on fresh connections until the destination answers; a lost GO
is settled that way, or -- when the destination is silent rather than gone --
the paused guest is held for an operator, who answers with SIGUSR1.

Destination (``DestRecovery``): when its control connection breaks after
CONFIRM it keeps the validated guest paused until a RECOVER (or the hold
time) says which side runs it; after RESUMED it stays reachable for a while,
in case that RESUMED was lost, and answers a RECOVER go again.

Operator (``send_decision``): ``mte-migrate resolve`` says the source's part
by hand.

Every recovery connection is RECOVER, the destination's challenge (WELCOME
with a nonce made for this connection), then AUTH proving the decision over
that nonce (``recover``); the destination acts only after the proof checks
out, so a RECOVER captured on one connection cannot be replayed on another."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable

from migrate.errors import (
    AuthError,
    Cancelled,
    DestinationGone,
    InDoubt,
    MigrationError,
    PeerError,
    ProtocolError,
    TransportError,
    one_line,
)
from migrate.net.transport import FrameChannel, connect, secure
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.protocol.machine import Connection, recovery_source_machine


async def recover(chan: FrameChannel, session: str, decision: str, key: bytes | None, timeout: float) -> None:
    """The source's half of a recovery connection up to the proof: RECOVER,
    the destination's challenge (WELCOME with a fresh nonce; an ERROR
    raises PeerError), then AUTH -- the decision proven over that nonce
    (empty without a key)."""
    await chan.send(fr.Recover(session, decision))
    challenge = await chan.recv(timeout=timeout)
    if challenge.type == fr.FrameType.ERROR:
        raise PeerError(f"destination: {challenge.message}", challenge.code)
    if challenge.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the destination speaks protocol version {challenge.version}, this side {PROTOCOL_VERSION}"
        )
    if key is not None:
        chan.conn.seal(key, "source")
    await chan.send(fr.Auth(auth.recover_proof(key, session, decision, challenge.nonce) if key else b""))


class SourceRecovery:
    """The source's part, for one migration's session."""

    def __init__(self, config, tls_config, session: str, result: dict, progress):
        self.config = config
        self.tls = tls_config
        self.session = session
        self.result = result
        self.progress = progress

    async def send(self, address, decision: str, cause: MigrationError, patience: float | None = None) -> None:
        """Send RECOVER(decision) on fresh connections until the destination
        answers (RESUMED for "go"), for up to ``patience`` seconds (three
        timeouts).  Raises DestinationGone if every attempt was refused
        (nothing listens: the destination VMM is gone), else InDoubt."""
        cfg = self.config
        key = auth.load_key(cfg.psk_file)
        deadline = time.monotonic() + (2 * cfg.timeout_s if patience is None else patience)
        last, refused = cause, True
        while time.monotonic() < deadline:
            chan = None
            try:
                sock = await connect(*address, cfg.timeout_s, cfg.tcp_congestion)
                io = await secure(sock, self.tls, False, cfg.timeout_s)
                conn = Connection(recovery_source_machine(), cfg.checksum, keyed=key is not None)
                chan = FrameChannel(sock, conn, cfg.timeout_s, io=io)
                wait = max(0.5, min(cfg.timeout_s, deadline - time.monotonic()))
                await recover(chan, self.session, decision, key, wait)
                if decision == "abort":
                    return
                reply = await chan.recv(timeout=max(0.5, min(cfg.timeout_s, deadline - time.monotonic())))
                if reply.type == fr.FrameType.ERROR:
                    raise PeerError(f"destination: {reply.message}", reply.code)
                return
            except MigrationError as exc:
                last = exc
                refused = refused and getattr(exc, "refused", False)
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            finally:
                if chan is not None:
                    chan.close()
        if refused:
            raise DestinationGone(one_line(last))
        raise InDoubt(one_line(last))

    async def settle_lost_go(self, address, lost: MigrationError) -> bool:
        """GO went out but RESUMED did not come back.  Returns True once the
        destination confirms it runs the guest; False when the guest is to
        resume here.  Raises InDoubt when nobody can tell."""
        try:
            await self.send(address, "go", lost)
            return True
        except DestinationGone as gone:
            # Nothing listens where the destination VMM was: it is gone, and
            # the guest with it -- the paused copy here is the only one left.
            self.progress.message(f"the destination is gone ({gone}); resuming the guest here")
            self.result["in_doubt"] = {"session": self.session, "resolution": "destination gone: resumed here"}
            return False
        except InDoubt as doubt:
            return await self.hold_for_operator(address, doubt)

    async def hold_for_operator(self, address, doubt: MigrationError) -> bool:
        """The destination is silent, not gone: it may be running the guest.
        Keep the paused guest and its full state here, keep asking the
        destination, and let the operator decide with a signal."""
        hold = self.config.in_doubt_hold_s
        host, port = address
        word = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, word.set)
        self.result["in_doubt"] = {"session": self.session, "held_s": hold}
        # An operator alert, not progress: always on stderr.
        print(
            f"mte-migrate source: IN DOUBT: GO was sent and {host}:{port} does not answer ({doubt}). The guest "
            f"is paused HERE with its full state for {hold:.0f} s (session {self.session}). If the destination "
            f"is not running it, resume it here with `kill -USR1 {os.getpid()}`; if it is, do nothing.",
            file=sys.stderr,
            flush=True,
        )
        try:
            answer = await self._ask_until(address, doubt, word, time.monotonic() + hold)
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        if answer is not None:
            return answer
        raise InDoubt(
            f"GO was sent and the destination never confirmed ({doubt}); after {hold:.0f} s nobody "
            f"said where the guest runs, so this source gives up its paused copy; the destination may "
            f"hold it: `mte-migrate resolve --connect {host}:{port} --session {self.session} go`"
        )

    async def _ask_until(self, address, doubt: MigrationError, word: asyncio.Event, deadline: float) -> bool | None:
        """Until ``deadline``, wait for the operator's word (False: resume
        here) and keep asking the destination (True: it runs the guest);
        None if neither answered."""
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(word.wait(), min(2.0, max(0.1, deadline - time.monotonic())))
                self.result["in_doubt"]["resolution"] = "operator: resumed here"
                return False
            except TimeoutError:
                pass
            if time.monotonic() >= deadline:
                break
            try:
                await self.send(address, "go", doubt, patience=min(2.0, deadline - time.monotonic()))
                self.result["in_doubt"]["resolution"] = "destination answered later"
                return True
            except DestinationGone:
                self.result["in_doubt"]["resolution"] = "destination gone: resumed here"
                return False
            except InDoubt:
                pass
        return None


class DestRecovery:
    """The destination's part: ``resume`` starts the staged guest here."""

    def __init__(self, config, key: bytes | None, result: dict, resume: Callable[[], None]):
        self.config = config
        self.key = key
        self.result = result
        self._resume = resume
        self._decision: asyncio.Future | None = None  # a RECOVER's (decision, channel), while in doubt
        self._lingering: asyncio.Future | None = None  # done once the source asked again after RESUMED

    @property
    def listening(self) -> bool:
        """In doubt, or lingering after RESUMED: a RECOVER may come."""
        return any(f is not None and not f.done() for f in (self._decision, self._lingering))

    async def take(self, frame, chan, hello, resumed: Callable[[], bool]) -> None:
        """A RECOVER for our session (``hello``'s): challenge it, then hand
        it to the waiting ``wait``, or, if the guest already runs here
        (``resumed()``), confirm that again."""
        if hello is None or frame.session != hello.session:
            raise ProtocolError("no migration is in doubt for that session")
        await self._challenge(frame, chan)
        if resumed():
            if frame.decision != "go":
                raise ProtocolError("the guest already runs here: it cannot be aborted")
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await chan.send(fr.Resumed())
            finally:
                chan.close()
            if self._lingering is not None and not self._lingering.done():
                self._lingering.set_result(True)  # the source knows now
            return
        future = self._decision
        if future is None or future.done():
            raise ProtocolError("no migration is in doubt for that session")
        future.set_result((frame.decision, chan))

    async def _challenge(self, frame, chan) -> None:
        """Answer RECOVER with a nonce made for this connection (WELCOME) and
        take the AUTH that proves the decision over it.  The nonce lives as
        long as this call and is checked once: nothing is remembered across
        connections, and a RECOVER and AUTH captured elsewhere name another
        nonce.  Without a key the proof is not checked (nor required)."""
        nonce = auth.new_nonce()
        await chan.send(fr.Welcome(PROTOCOL_VERSION, nonce))
        if self.key is not None:
            chan.conn.seal(self.key, "destination")
        answer = await chan.recv()
        if answer.type != fr.FrameType.AUTH:  # ERROR or ABORT: the source gave up
            raise ProtocolError(f"the recovery connection ended with {answer.type.name} instead of AUTH")
        if self.key is not None and not auth.check_recover(
            self.key, answer.proof, frame.session, frame.decision, nonce
        ):
            raise AuthError(
                f"RECOVER {frame.decision} failed authentication: its proof is not over this connection's "
                f"challenge (a replayed RECOVER, or another key); nothing changed here"
            )

    async def wait(self, cause: MigrationError, session: str) -> bool:
        """The connection broke after CONFIRM and before GO: the source may
        or may not have given the guest up.  Keep the validated guest paused
        and wait for the source (or an operator) to say which.  Returns True
        once resumed here."""
        wait = self.config.in_doubt_hold_s
        self._decision = asyncio.get_running_loop().create_future()
        # An operator alert, not progress: always on stderr.
        print(
            f"mte-migrate dest: IN DOUBT after: {one_line(cause)}; the validated guest is paused HERE for up to "
            f"{wait:.0f} s; if the source gave it up, resume it here with `mte-migrate resolve --connect "
            f"THIS-HOST:PORT --session {session} go` (or `abort` if the source kept it)",
            file=sys.stderr,
            flush=True,
        )
        self.result["in_doubt"] = {"session": session, "cause": one_line(cause)}
        try:
            decision, chan = await asyncio.wait_for(self._decision, wait)
        except TimeoutError:
            raise InDoubt(
                f"in doubt after: {one_line(cause)}; nobody said GO or ABORT within {wait:.0f} s, "
                f"so the partial-or-not guest is discarded here (the source keeps it if it never sent GO)"
            ) from None
        try:
            if decision != "go":
                raise Cancelled("the source kept the guest (RECOVER abort)")
            self._resume()
            async with asyncio.timeout(self.config.timeout_s):
                await chan.send(fr.Resumed())
            return True
        finally:
            chan.close()

    async def linger(self, chan) -> None:
        """After RESUMED: the source closes its connection once it has read
        it.  If that clean close does not come, RESUMED may be lost: stay
        reachable for a while so the source's RECOVER go is answered."""
        try:
            await chan.recv(timeout=self.config.timeout_s)
        except TransportError as exc:
            if "closed the connection between frames" in str(exc):
                return  # the source read RESUMED and hung up
        except MigrationError:
            pass
        self._lingering = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._lingering, self.config.in_doubt_hold_s)
        except TimeoutError:
            pass


async def send_decision(
    address: tuple[str, int], session: str, decision: str, key: bytes | None, tls_config, timeout: float
) -> str:
    """``mte-migrate resolve``: tell the destination of ``session`` what the
    source decided -- "go" (it runs the guest; waits for its RESUMED) or
    "abort" (it discards its copy).  Returns the sentence to print."""
    sock = await connect(*address, timeout)
    io = await secure(sock, tls_config, False, timeout)
    chan = FrameChannel(sock, Connection(recovery_source_machine(), keyed=key is not None), timeout, io=io)
    try:
        await recover(chan, session, decision, key, timeout)
        if decision == "go":
            reply = await chan.recv()
            if reply.type == fr.FrameType.ERROR:
                raise MigrationError(f"destination: {reply.message}")
            return "the guest is running on the destination"
        return "the destination discards its copy; the guest stays with the source"
    finally:
        chan.close()
