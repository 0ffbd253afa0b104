"""Postcopy recovery: after the switch a broken link pauses both sides, and
a fresh connection resumes the same migration.

After the switch neither side alone holds the whole guest: it runs on the
destination, and the pages it still lacks are only in the source's paused
copy.  So a broken link (cut, stall past the timeout, a page refused) ends
nothing.  The destination keeps its guest running (vCPUs that touch a
missing page wait) and its postcopy state, and listens for the session's
RECOVER "postcopy" for ``--postcopy-hold`` seconds.  The source keeps its
paused guest and reconnects: by itself with ``--retry``, otherwise when the
operator says so (``mte-migrate resume``, a signal).  The recovery
connection is authenticated like the in-doubt one (recovery.recover: the
destination's fresh challenge, the proof over it, sealed when keyed); then
the destination lists the pages it still lacks, the source's pending set
becomes exactly those, and postcopy goes on over that connection.

This module only makes the new channel and the list of missing pages
(``SourcePostcopyHold.reconnect``, ``DestPostcopyHold.wait``); what flows
on it afterwards is postcopy.py's."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from migrate.engine.recovery import recover
from migrate.errors import (
    MigrationError,
    PeerError,
    ProtocolError,
    one_line,
)
from migrate.net.transport import FrameChannel, connect, secure
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.machine import Connection, recovery_source_machine

#: the decision word of a RECOVER that resumes a paused postcopy
DECISION = "postcopy"
#: what `mte-migrate resume` sends: ignored by default, so a late one kills
#: nothing (SIGUSR1 is the in-doubt word, SIGUSR2 the kvm backend's vCPU kick)
RESUME_SIGNAL = signal.SIGURG
#: the ERROR code of a destination whose guest never resumed (it discarded its copy)
NOT_RESUMED = "not-resumed"
#: seconds between automatic attempts (--retry): doubled each time, up to the last
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)


class PostcopyPaused(MigrationError):
    """After the switch the link broke and nobody resumed the migration."""

    code = "postcopy-paused"
    status = "postcopy-paused"


class PostcopyLost(MigrationError):
    """The destination gives up a guest that still lacks pages: it cannot run on."""

    code = "postcopy-lost"
    status = "postcopy-lost"


class NotResumed(MigrationError):
    """The destination says the guest never resumed there (the link broke
    during the switch): the paused copy here is the only one, and resumes."""

    code = NOT_RESUMED


class ResumedHere(MigrationError):
    """The operator declared the destination dead: the source's paused copy runs again."""

    code = "resumed-here"


def _alert(text: str) -> None:
    # An operator alert, not progress: always on stderr.
    print(text, file=sys.stderr, flush=True)


# -- source ------------------------------------------------------------------------------
class SourcePostcopyHold:
    """The source's part: hold the paused guest and reconnect.

    ``retries``: attempts made without the operator (``--retry``); after
    them, and without any, the source waits for SIGURG (``mte-migrate
    resume --pid``: try again now) or SIGUSR1 (the destination is dead:
    resume the paused copy here) until ``config.postcopy_hold_s`` runs out."""

    def __init__(self, config, tls_config, session: str, address, npages: int, retries: int, result: dict):
        self.config = config
        self.tls = tls_config
        self.session = session
        self.address = address
        self.npages = npages
        self.retries = retries
        self.result = result
        self.attempts = 0  # reconnections tried, over every pause
        self.pauses = 0

    async def reconnect(self, cause: MigrationError, announced: bytearray, missing: int):
        """A fresh, authenticated channel and the destination's missing pages
        (ranges, each within ``announced``: 1 per page announced at the switch).
        Raises PostcopyPaused when the hold ran out, ResumedHere when the
        operator chose to resume the paused copy here."""
        cfg = self.config
        hold = cfg.postcopy_hold_s
        host, port = self.address
        pid = os.getpid()
        self.pauses += 1
        record = self.result.setdefault("postcopy_recovery", {"pauses": 0, "attempts": 0, "causes": []})
        record["pauses"] = self.pauses
        record["causes"].append(one_line(cause))
        auto = self.retries - self.attempts
        _alert(
            f"mte-migrate source: POSTCOPY PAUSED: the link to {host}:{port} broke after the switch "
            f"({one_line(cause)}). The guest runs on the destination; the pages it lacks ({missing} not sent yet, and "
            f"any in flight) are only in this paused copy, held for {hold:.0f} s (session {self.session}). "
            + (f"Reconnecting by itself ({auto} attempts left). " if auto > 0 else "")
            + f"Resume the migration with `mte-migrate resume --pid {pid}`; if the destination is dead, "
            f"`kill -USR1 {pid}` resumes this copy as of the switch (what the guest did there is lost)."
        )
        now_word, here_word = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(RESUME_SIGNAL, now_word.set)
        loop.add_signal_handler(signal.SIGUSR1, here_word.set)
        deadline = time.monotonic() + hold
        last: MigrationError = cause
        gone = False
        try:
            while time.monotonic() < deadline:
                if self.attempts < self.retries:
                    k = min(self.attempts, len(BACKOFF_S) - 1)
                    await self._wait(now_word, here_word, min(BACKOFF_S[k], deadline - time.monotonic()))
                else:
                    await self._wait(now_word, here_word, deadline - time.monotonic())
                    if not now_word.is_set() and not here_word.is_set():
                        break  # the hold ran out
                if here_word.is_set():
                    record["resolution"] = "operator: resumed the paused copy here"
                    raise ResumedHere(
                        "the operator resumed the paused copy here (`kill -USR1`): the guest runs on the source "
                        "again as of the postcopy switch; what it did on the destination since is lost"
                    )
                now_word.clear()
                self.attempts += 1
                record["attempts"] = self.attempts
                try:
                    chan, ranges = await self._attempt(announced)
                except PeerError as exc:
                    if exc.remote_code != NOT_RESUMED:
                        last = exc
                        _alert(f"mte-migrate source: postcopy resume attempt {self.attempts} failed: {one_line(exc)}")
                        continue
                    record["resolution"] = "the destination never resumed the guest: resumed here"
                    raise NotResumed(
                        f"the link broke during the postcopy switch ({one_line(cause)}), before the guest resumed "
                        f"on the destination, which discarded its copy ({one_line(exc)}): the guest runs on here"
                    ) from None
                except MigrationError as exc:
                    last = exc
                    gone = bool(getattr(exc, "refused", False))
                    _alert(f"mte-migrate source: postcopy resume attempt {self.attempts} failed: {one_line(exc)}")
                    continue
                record["resolution"] = f"resumed on attempt {self.attempts}"
                return chan, ranges
        finally:
            loop.remove_signal_handler(RESUME_SIGNAL)
            loop.remove_signal_handler(signal.SIGUSR1)
        if gone:
            raise PostcopyPaused(
                f"the destination is gone ({one_line(last)}): the guest as it ran there is lost; this source "
                f"held its paused copy as of the switch, the only one left, for {hold:.0f} s and nobody resumed "
                f"it here (`kill -USR1 {pid}`), so it ends with this process"
            )
        raise PostcopyPaused(
            f"postcopy paused after: {one_line(cause)}; no resume within {hold:.0f} s (last: {one_line(last)}); "
            f"the guest ran on the destination, which keeps it only for its own --postcopy-hold; this source "
            f"held its paused copy as of the switch, the only complete one, and nobody resumed it here "
            f"(`kill -USR1 {pid}`), so it ends with this process"
        )

    async def _wait(self, now_word: asyncio.Event, here_word: asyncio.Event, seconds: float) -> None:
        """Until either word comes or ``seconds`` pass."""
        waits = [asyncio.ensure_future(now_word.wait()), asyncio.ensure_future(here_word.wait())]
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _attempt(self, announced: bytearray):
        """One recovery connection: RECOVER "postcopy", the challenge and
        proof (recovery.recover), then the destination's list."""
        cfg = self.config
        key = auth.load_key(cfg.psk_file)
        sock = await connect(*self.address, cfg.timeout_s, cfg.tcp_congestion)
        chan = None
        try:
            io = await secure(sock, self.tls, False, cfg.timeout_s)
            conn = Connection(recovery_source_machine(), cfg.checksum, keyed=key is not None)
            conn.ram_pages = self.npages  # bounds the destination's ranges
            chan = FrameChannel(sock, conn, cfg.timeout_s, io=io)
            await recover(chan, self.session, DECISION, key, cfg.timeout_s)
            ranges = await self.missing_list(chan, announced)
            return chan, ranges
        except BaseException:
            if chan is not None:
                chan.close()
            else:
                sock.close()
            raise

    @staticmethod
    async def missing_list(chan, announced: bytearray) -> list:
        """The destination's POSTCOPY frames without a table, up to ``last``:
        pages it still lacks, each one the source announced at the switch,
        none twice."""
        limit = announced.count(1)
        seen = bytearray(len(announced))
        ranges, total = [], 0
        while True:
            frame = await chan.recv()
            if frame.type == fr.FrameType.ERROR:
                raise PeerError(f"destination: {frame.message}", frame.code)
            if frame.type != fr.FrameType.POSTCOPY or frame.table:
                raise ProtocolError(f"expected the list of missing pages, got {frame.type.name}")
            for first, count in frame.ranges:
                end = first + count
                if announced.find(0, first, end) >= 0 or seen.find(1, first, end) >= 0:
                    raise ProtocolError(
                        f"the destination asks again for pages {first}..{end - 1}: not all announced at the "
                        f"switch, or listed twice"
                    )
                seen[first:end] = b"\x01" * count
                total += count
                ranges.append((first, count))
            if total > limit:  # cannot happen after the checks above; bounds the loop all the same
                raise ProtocolError("the destination lists more pages than were announced")
            if frame.last:
                return ranges


# -- destination ---------------------------------------------------------------------------
class DestPostcopyHold:
    """The destination's part: wait for the source's RECOVER "postcopy".
    ``challenge(frame, chan)``: the in-doubt recovery's challenge and proof
    check (the same handshake, the same key)."""

    def __init__(self, config, challenge: Callable[..., Awaitable[None]]):
        self.config = config
        self._challenge = challenge
        self._waiting: asyncio.Future | None = None

    @property
    def listening(self) -> bool:
        return self._waiting is not None and not self._waiting.done()

    async def take(self, frame, chan, hello) -> None:
        """A RECOVER "postcopy" on a later connection: challenge it, then hand
        the channel to ``wait``."""
        if hello is None or frame.session != hello.session or not self.listening:
            raise ProtocolError("no postcopy is paused for that session")
        await self._challenge(frame, chan)
        if not self.listening:  # the hold ran out meanwhile
            raise ProtocolError("no postcopy is paused for that session")
        self._waiting.set_result(chan)

    async def wait(self, cause: MigrationError, session: str, missing: int, address: str) -> FrameChannel:
        """Hold the running guest for the source; the recovery channel, or
        PostcopyLost when ``postcopy_hold_s`` ran out."""
        hold = self.config.postcopy_hold_s
        _alert(
            f"mte-migrate dest: POSTCOPY PAUSED after: {one_line(cause)}; the guest runs HERE with {missing} "
            f"pages missing (vCPUs that touch them wait); they are only on the paused source. Waiting {hold:.0f} s "
            f"for it to resume (session {session}, listening on {address}): on the source, "
            f"`mte-migrate resume --pid SOURCE-PID`."
        )
        chan = await self.accept(hold)
        if chan is None:
            raise PostcopyLost(
                f"postcopy paused after: {one_line(cause)}; the source did not resume within {hold:.0f} s: "
                f"the guest here still lacks {missing} pages, its vCPUs cannot proceed, and it is lost with this "
                f"process; the source holds its paused copy as of the switch"
            )
        return chan

    async def accept(self, seconds: float) -> FrameChannel | None:
        """The next authenticated RECOVER "postcopy" channel, or None after ``seconds``."""
        self._waiting = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(self._waiting, seconds)
        except TimeoutError:
            return None
        finally:
            self._waiting = None
