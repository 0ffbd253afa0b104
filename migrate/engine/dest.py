"""The destination VMM's migration engine.  It treats the stream as hostile,
applies pages in place, and resumes the guest only after the source has seen
a matching digest and said GO.  On any failure it discards what it received
and never resumes a partial guest.

``DestVmm.receive`` is the handshake, then one control frame after another,
each to its handler (``_on_pages`` ... ``_on_go``), until the guest runs
here.  Later connections go through ``_admit``: data channels
(``dest_channels.DataChannels``) or, in the in-doubt window, a RECOVER
(``recovery.DestRecovery``)."""

import asyncio
import logging
import socket
import sys
import threading
import time

from hosts.uffd import Userfaultfd, punch_pages, unmap_ranges
from hosts.vcpu import VcpuState
from migrate.engine.bitmaps import merge_ranges, pages_bitmap, runs
from migrate.engine.dest_channels import DataChannels
from migrate.engine.digest import MemoryDigest, chunk_count, page_detail, state_digest
from migrate.engine.handshake import authenticate, hello_mismatch
from migrate.engine.pages import BatchApplier, BatchStats
from migrate.engine.postcopy import BACKGROUND_BACKLOG, DestFaultChannel, DestPostcopy, announcements
from migrate.engine.postcopy_recovery import NOT_RESUMED, DestPostcopyHold, PostcopyLost
from migrate.engine.progress import Progress
from migrate.engine.recovery import DestRecovery
from migrate.engine.report import empty_result, protection
from migrate.errors import (
    AuthError,
    Cancelled,
    GuestFaulted,
    HandshakeMismatch,
    MigrationError,
    PeerError,
    PeerTimeout,
    ProtocolError,
    TransportError,
    one_line,
)
from migrate.net import tls
from migrate.net.transport import FrameChannel, accept, bound_backlog, secure, tune
from migrate.net.watch import ReceiveWatch
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.protocol.machine import Connection, DestState, data_dest_machine, dest_machine
from migrate.strategies import STRATEGIES

log = logging.getLogger("migrate.engine.dest")
T = fr.FrameType
#: after a failure, how long the control connection waits for the source to
#: close it too (having read the ERROR) before it is closed anyway
FAILURE_CLOSE_S = 1.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class DestVmm:
    """``strategy``: the strategy this destination insists on, or None to
    accept any it supports.  ``expect_uuid``: refuse any other guest."""

    #: connections being admitted at once (each holds one receive buffer)
    MAX_PENDING = 16

    def __init__(
        self,
        host,
        config,
        scenario: str = "custom",
        strategy: str | None = None,
        expect_uuid: str | None = None,
        progress: Progress | None = None,
    ):
        self.host = host
        self.config = config
        self.scenario = scenario
        self.required_strategy = strategy
        self.expect_uuid = expect_uuid
        self.progress = progress or Progress(False)
        self.result = empty_result(scenario, strategy or "any")
        self.result["guest_on"] = "nowhere"
        self.stats = BatchStats()
        self.machine = None  # the control connection's state machine
        self.resumed = False
        self.hello = None  # the source's HELLO, once it authenticated
        self.chan: FrameChannel | None = None  # the control connection
        self.strategy = None
        self._started = 0.0  # perf_counter() when the control connection came
        self._counters_before = None
        self._error: MigrationError | None = None
        # -- handshake
        self._key = auth.load_key(config.psk_file)
        self._nonce = b""  # ours, from WELCOME: data channels' JOIN proofs name it
        self._tls = tls.from_options(config.tls_cert, config.tls_key, config.tls_ca)
        self._handshaking = False
        self._ready = asyncio.Event()  # the handshake is done: data channels may join
        # -- receiving
        self._channels = DataChannels(config.timeout_s, lambda: bool(self.machine and self.machine.finished))
        self._applier: BatchApplier | None = None  # the control connection's
        self._digest: MemoryDigest | None = None
        self._refresher: asyncio.Task | None = None  # background digest refreshes while pages land
        self._refresh_job: asyncio.Future | None = None  # the refresh running in a thread
        self._refresh_stop = threading.Event()  # set: a running refresh leaves its remaining chunks stale
        self._early_digest = None  # (final pass, task) once STATE arrived
        self._guest_state: dict | None = None  # from STATE
        self._state_digest = ""  # of the state as loaded, taken when STATE arrives
        self._staged_workload = None  # built from STATE, runs on GO
        self._recovery = DestRecovery(config, self._key, self.result, self._resume)
        # -- postcopy
        self._announced: list = []  # POSTCOPY ranges so far, until the last announcement
        self._ahead: list = []  # ranges to discard ahead of the switch, until the last of them
        self._discarded: bytearray | None = None  # 1 per page discarded ahead
        self._postcopy: DestPostcopy | None = None
        self._postcopy_done = False
        self._faults: DestFaultChannel | None = None  # the fault channel, once joined
        self._watch: ReceiveWatch | None = None  # interrupts a control receive on failure or silence
        self._fault_history: list[DestFaultChannel] = []  # every fault channel, for the byte counts
        self._faults_joined = asyncio.Event()
        self._all_landed = asyncio.Event()  # every postcopy page is here (set from either thread)
        self._postcopy_hold = DestPostcopyHold(config, self._recovery._challenge)
        self._switch_confirm = None  # CONFIRM at the switch: sent again on a recovery connection
        self._retired: list[FrameChannel] = []  # control connections replaced by postcopy recovery
        self._address = "?"  # where later connections come (for the operator)
        self._switch_interval = sys.getswitchinterval()
        self._send_lock = asyncio.Lock()  # REQUESTs go out while the main loop may send too

    async def serve(self, listener: socket.socket) -> dict:
        """Accept one migration on ``listener``; refuse any other connection."""
        listener.setblocking(False)
        self._address = "{}:{}".format(*listener.getsockname()[:2])
        while True:
            sock, peer = await accept(listener)
            tune(sock)
            try:
                io = await secure(sock, self._tls, True, self.config.timeout_s)
                break
            except MigrationError as exc:  # a stranger without our CA's certificate
                log.warning("refused a connection: %s", one_line(exc))
                sock.close()
        acceptor = asyncio.ensure_future(self._accept_more(listener))
        try:
            return await self.receive(sock, io)
        finally:
            acceptor.cancel()

    async def receive(self, sock: socket.socket, io=None) -> dict:
        """Receive one migration on the control connection ``sock``; returns the result."""
        self.result["ram"]["total_bytes"] = self.host.memory.size
        self._started = time.perf_counter()
        self._counters_before = self.host.counters.snapshot()
        conn = Connection(dest_machine(), self.config.checksum, keyed=self._key is not None)
        self.machine = conn.machine
        self.chan = FrameChannel(sock, conn, self.config.timeout_s, io=io)
        try:
            await self._handshake()
            handlers = self._handlers()
            # GO resumes the guest here; in postcopy, POSTCOPY does, and the
            # missing pages follow until the source's last PASS_END
            while not self.resumed or (self._postcopy is not None and not self._postcopy_done):
                try:
                    frame = await self._recv_control()
                    await handlers[frame.type](frame)
                except MigrationError as exc:
                    if not await self._resume_postcopy(exc):
                        raise
        except asyncio.CancelledError:
            self._fail(Cancelled("cancelled by the user"))
            if self._postcopy is not None and not self._postcopy_done:
                self._postcopy_lost()
        except MigrationError as exc:
            await self._on_failure(exc)
        except Exception as exc:
            log.exception("internal error")
            self._fail(MigrationError(f"internal error: {type(exc).__name__}: {one_line(exc)}"))
        finally:
            await self._clean_up()
            self._fill_stats()
        return self.result

    def _handlers(self) -> dict:
        """What each control frame does.  The state machine (DEST_TABLE) has
        already refused any frame out of order, and lets no other type through."""
        return {
            T.PAGES: self._on_pages,
            T.PASS_END: self._on_pass_end,
            T.STATE: self._on_state,
            T.COMPLETE: self._on_complete,
            T.INSPECT: self._on_inspect,
            T.GO: self._on_go,
            T.POSTCOPY: self._on_postcopy,
            T.ERROR: self._on_error,
            T.ABORT: self._on_abort,
        }

    # -- handshake ------------------------------------------------------------------
    def _ram_ready(self) -> bool:
        """Every page of RAM allocated already (--prealloc): landing a page
        costs a copy, no fault, and the source may send on one channel."""
        mem = self.host.memory
        return mem.prefaulted(0, mem.npages)

    async def _handshake(self) -> None:
        """HELLO must match this host, AUTH must prove the key; then pages may land."""
        hello = await self.chan.recv()
        mismatch = hello_mismatch(hello, self.host, self.required_strategy, self.expect_uuid)
        if mismatch:
            await self.chan.send(fr.Error("mismatch", mismatch))
            raise HandshakeMismatch(mismatch)
        self._prepare(hello)
        self._handshaking = True
        self._nonce = auth.new_nonce()
        await authenticate(self.chan, hello, self._key, self._nonce, self._ram_ready())
        if hello.postcopy:
            # Authenticated: userfaultfd finds a missing page by its 4 KiB hole.
            why_not = self.host.memory.use_small_pages()
            if why_not:
                mismatch = (
                    f"the source may switch to postcopy, which needs 4 KiB pages, and this destination's "
                    f"guest RAM is on huge pages ({why_not}); start it with --postcopy or --huge-pages off"
                )
                await self.chan.send(fr.Error("mismatch", mismatch))
                raise HandshakeMismatch(mismatch)
        self.hello = hello
        # Authenticated: whole chunks of raw data are spliced into place
        # from here on (never a frame the checks below would refuse).
        applier = self._applier
        self.chan.placer = lambda fields, dl: (
            None if fields["pass_no"] <= self._channels.pass_seen[0] else applier.placement(fields, dl)
        )
        self._ready.set()
        self._refresher = asyncio.ensure_future(self._refresh_loop())
        self.result["setup_time_ms"] = _ms(time.perf_counter() - self._started)

    def _prepare(self, hello) -> None:
        """The strategy the source uses, the digest, the appliers."""
        host = self.host
        self.result["strategy"] = hello.strategy
        self.strategy = STRATEGIES[hello.strategy](host, self.config)
        self.strategy.setup_dest()
        # Digest incrementally: chunks are marked stale as pages land and
        # re-read in the background after each pass, so completion only
        # reads what the last pass wrote.
        self._digest = MemoryDigest(host.memory, compute=False)
        self._applier = BatchApplier(
            self.strategy, host.memory.npages, on_write=self._digest.mark_stale, digest=self._digest
        )
        self._channels.start(self.chan, self._lane_applier)

    def _lane_applier(self) -> BatchApplier:
        """A data channel's applier: its own decompressor, the shared page maps."""
        return BatchApplier(
            self.strategy,
            self.host.memory.npages,
            self._applier.written,
            self._applier.has_tags,
            on_write=self._digest.mark_stale,
            digest=self._digest,
            torn=self._applier.torn,
        )

    # -- control frames -------------------------------------------------------------
    async def _recv_control(self):
        """The next control frame; fails as soon as a data channel fails, and
        times out once no channel at all has received for --timeout (checked
        a few times per timeout, so detection takes at most ~1.25 timeouts).
        The watch is armed around a plain receive, not raced against it: a
        task and an asyncio.wait per frame were a third of the event loop's
        time in postcopy, time the fault channel's thread waited for."""
        failure = self._channels.failure
        if self._postcopy is not None:
            # After the switch this connection and the fault channel carry the
            # migration: data channels, done with their passes, may die with a
            # cut link.
            faults = self._faults
            serving = faults is not None and faults.failure is not None and not faults.closing
            failure = faults.failure if serving else None
        if failure is not None and failure.done():
            raise failure.exception()
        if self._watch is None:
            self._watch = ReceiveWatch(self._silent, self.config.timeout_s / 4)
        return await self._watch.receive(self.chan.recv(timeout=None), failure)

    def _silent(self) -> MigrationError | None:
        """For the watch: the source's silence, once it lasts --timeout."""
        if self._postcopy is not None:
            if time.monotonic() - self.chan.last_activity >= self.config.timeout_s:
                return PeerTimeout(f"source sent nothing for {self.config.timeout_s:g} s")
        elif not self._channels.active():
            return PeerTimeout(f"source sent nothing for {self.config.timeout_s:g} s")
        return None

    async def _on_pages(self, frame) -> None:
        if self._postcopy is not None:
            self.stats.normal_pages += self._postcopy.place(frame)
            return
        if frame.pass_no <= self._channels.pass_seen[0]:
            raise ProtocolError(f"PAGES of pass {frame.pass_no} after that pass ended")
        self._refuse_after_discard("PAGES")
        self.stats.add(self._applier.apply(frame))

    async def _on_pass_end(self, frame) -> None:
        if self._postcopy is not None:
            await self._end_postcopy(frame)
            return
        self._refuse_after_discard("PASS_END")
        self.result["dirty_sync_count"] = frame.pass_no
        self._channels.pass_seen[0] = frame.pass_no
        self._start_refresh()
        task = asyncio.ensure_future(self._acknowledge(frame.pass_no))
        task.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure shows on the connection

    async def _acknowledge(self, pass_no: int) -> None:
        """APPLIED once every channel has delivered pass ``pass_no`` and the
        digest has caught up with it: the source waits for this before it
        decides to stop, so the pause does not find this side still busy.
        Not for the final pass (STATE follows it: nothing waits)."""
        await self._channels.await_final_pass(pass_no, self.hello.channels)
        for _ in range(3):  # what landed while a refresh ran makes more stale
            job = self._refresh_job
            if job is not None and not job.done():
                await asyncio.wait({job})
            if not self._digest.pending(unread=False):
                break
            self._start_refresh()
        torn = self._take_torn(fr.Applied.MAX_TORN)
        async with self._send_lock:
            if self.machine.state == DestState.RECEIVING and not self.chan.closed:
                await self.chan.send(fr.Applied(pass_no, torn))

    def _take_torn(self, limit: int | None = None) -> list:
        """The torn frames recorded so far (see Pages.live), merged into
        ranges, and the list emptied (pop: the channels' threads append).
        Beyond ``limit`` ranges the narrowest gaps between them are closed
        (a range then only needs one written page among more)."""
        shared, taken = self._applier.torn, []
        while shared:
            taken.append(shared.pop())
        merged = merge_ranges(taken)
        if limit is not None and len(merged) > limit:
            gaps = sorted(range(1, len(merged)), key=lambda i: merged[i][0] - sum(merged[i - 1]))
            closed = set(gaps[: len(merged) - limit])
            wide: list = []
            for i, (first, count) in enumerate(merged):
                if i in closed:
                    wide[-1] = (wide[-1][0], first + count - wide[-1][0])
                else:
                    wide.append((first, count))
            merged = wide
        return merged

    def _no_torn_left(self) -> None:
        """Torn frames are excused only in a pass the source then holds to a
        dirty harvest (APPLIED): one in the final pass, of a paused guest, is corrupt."""
        torn = self._take_torn()
        if torn:
            first, count = torn[0]
            raise ProtocolError(
                f"PAGES frame of pages {first}..{first + count - 1} failed its data checksum in the final pass "
                "(marked live, but the guest was paused): the stream is corrupt"
            )

    async def _on_state(self, frame) -> None:
        self._guest_state = frame.state
        self._load_state(frame.state)
        # Nothing changes the loaded state until GO: digest it now, while the
        # final pass lands, not after the memory digest (the downtime waits).
        self._state_digest = state_digest(self._loaded_state())
        self._start_final_digest(self._channels.pass_seen[0])

    async def _on_complete(self, frame) -> None:
        self._refuse_after_discard("COMPLETE")  # a stop-and-copy would leave the discarded pages as holes
        await self._channels.await_final_pass(frame.final_pass, self.hello.channels)
        await self._confirm(self._guest_state, frame.final_pass)

    async def _on_inspect(self, frame) -> None:
        self._check_chunks(frame.chunks)
        detail = await asyncio.get_running_loop().run_in_executor(None, page_detail, self.host.memory, frame.chunks)
        await self.chan.send(fr.Inspection(frame.chunks, detail))

    async def _on_go(self, frame) -> None:
        self._resume()
        self.result["status"] = "completed"
        try:
            await self.chan.send(fr.Resumed())
        except MigrationError:
            pass  # the source will ask again (RECOVER go): we linger for it
        await self._recovery.linger(self.chan)

    # -- postcopy -----------------------------------------------------------------------
    async def _on_postcopy(self, frame) -> None:
        if not self.hello.postcopy:
            raise ProtocolError("POSTCOPY, but the source's HELLO did not say it may switch to postcopy")
        if frame.table:
            if self._postcopy is None:
                raise ProtocolError("a POSTCOPY table before the switch")
            self._postcopy.add_table(frame)
            return
        if self._postcopy is not None:
            raise ProtocolError("POSTCOPY announced pages after the switch")
        if self.machine.state == DestState.RECEIVING:
            await self._discard_ahead(frame)
            return
        self._announced += frame.ranges
        if frame.last:
            await self._switch_to_postcopy(self._announced)

    async def _discard_ahead(self, frame) -> None:
        """Before the pause, pages the guest dirtied since the last pass:
        the switch will fetch them, so discard them now, while the source's
        guest still runs, and say so (APPLIED of the postcopy pass).  Only
        once every channel has delivered the last pass: nothing may land on
        a page after it was discarded."""
        if not self._take_discard_ahead(frame):
            return
        last_pass = self._channels.pass_seen[0]
        await self._channels.await_final_pass(last_pass, self.hello.channels)
        self._discard_ahead_now()
        async with self._send_lock:
            await self.chan.send(fr.Applied(last_pass + 1))

    def _refuse_after_discard(self, what: str) -> None:
        if self._discarded is not None:
            raise ProtocolError(f"{what} after pages were discarded ahead of a postcopy switch: only STATE may follow")

    def _take_discard_ahead(self, frame) -> bool:
        """Collect a discard-ahead frame's ranges; True at the last."""
        if self.strategy.postcopy_mode != "missing":
            # MINOR mode unmaps at the switch, after the digest: the digest
            # reads through the guest's mapping, which on a real host would
            # map an unmapped page again (and it would never fault).
            raise ProtocolError(f"strategy {self.strategy.name} does not discard ahead of a postcopy switch")
        if self._discarded is not None:
            raise ProtocolError("pages discarded ahead twice")
        self._ahead += frame.ranges
        return frame.last

    def _discard_ahead_now(self) -> None:
        self._channels.frozen = True  # no page may land on a discarded one: PAGES refused from now on
        self._discard(self._ahead)
        self._discarded = pages_bitmap(self._ahead, self.host.memory.npages)
        self._ahead = []

    def _discard(self, ranges) -> None:
        """A system call per range: MISSING mode punches the pages out of the
        memfd (UFFDIO_COPY needs them gone); MINOR mode unmaps them (the
        memfd keeps them for UFFDIO_CONTINUE)."""
        discard = punch_pages if self.strategy.postcopy_mode == "missing" else unmap_ranges
        discard(self.host.vm, ranges)

    def _left_to_discard(self, ranges) -> list:
        """What the switch announced and was not discarded ahead.  A page
        discarded ahead and not announced would run as a hole: refused."""
        npages = self.host.memory.npages
        announced = int.from_bytes(pages_bitmap(ranges, npages), "little")
        ahead = int.from_bytes(self._discarded or bytes(npages), "little")
        if ahead & ~announced:
            stray = ahead & ~announced
            page = ((stray & -stray).bit_length() - 1) // 8  # a byte per page, little-endian
            raise ProtocolError(f"page {page} was discarded ahead but the switch did not announce it")
        late = (announced & ~ahead).to_bytes(npages, "little")
        return [(a, b - a) for a, b in runs(late, 1)]

    async def _switch_to_postcopy(self, ranges) -> None:
        """Every channel has delivered the last pass and the digest of what
        is here is taken (with the guest still stopped); drop the pages the
        source will send, register the userfaultfd, resume, CONFIRM."""
        t = time.perf_counter()
        if self.strategy.postcopy_mode is None:
            raise ProtocolError(f"strategy {self.strategy.name} cannot do postcopy")
        early = self._early_digest
        if early is None:
            raise ProtocolError("POSTCOPY before STATE")
        await early[1]  # every channel done with the last pass, the digest refreshed
        self._no_torn_left()
        try:  # opened before the source paused: here by now, but its admission may lag
            async with asyncio.timeout(self.config.timeout_s):
                await self._faults_joined.wait()
        except TimeoutError:
            raise ProtocolError("POSTCOPY without a fault channel: the source never joined one") from None
        self.chan.placer = None  # pages land through the userfaultfd from now on
        late = self._left_to_discard(ranges)
        self._discard(late)
        uffd = Userfaultfd(self.host.vm, self.strategy.postcopy_mode)
        uffd.mark_missing(ranges)  # every page announced faults from now on
        self.host.vm.uffd = uffd
        pc = self._postcopy = DestPostcopy(self.host, self.strategy, uffd, ranges)
        pc.discarded_at_switch = sum(c for _, c in late)
        pc.wrong_before = self.host.counters.get("guest.wrong_tag_accesses")
        sdigest = self._state_digest  # of what will run, read back when STATE arrived
        loop = asyncio.get_running_loop()
        pc.on_complete = lambda: loop.call_soon_threadsafe(self._all_landed.set)
        self._faults.start(pc)
        bound_backlog(self.chan.sock, BACKGROUND_BACKLOG)  # see BACKGROUND_BACKLOG
        self._fast_switching()
        digest = self._digest
        self._switch_confirm = fr.Confirm(digest.data_digest(), digest.tag_digest(), sdigest, digest.chunk_crcs())
        try:
            # CONFIRM goes just before the guest resumes: the source's clock of
            # the switch stops at it, and running vCPUs would hold up its send.
            async with self._send_lock:
                await self.chan.send(self._switch_confirm)
        finally:
            self._resume()  # whatever the link does, the guest runs here now (it has left the source)
            pc.resumed_at = time.perf_counter()
            self.result["postcopy_switch_ms"] = _ms(pc.resumed_at - t)
        if pc.total == 0:
            pc.last_page_at = pc.resumed_at
            self._all_landed.set()

    def _fast_switching(self) -> None:
        # The vCPU threads and the VMM's share one interpreter lock: let a
        # fault's round trip (event, REQUEST, page, placement) have it back
        # within 0.5 ms instead of the default 5 ms per hand-over.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, 0.0005))

    async def _resume_postcopy(self, exc: MigrationError) -> bool:
        """After the switch a failure pauses postcopy: keep the guest running
        (vCPUs on missing pages wait), keep every page and table entry, and
        wait for the source's recovery connection (postcopy_recovery).  On
        it, list the pages still missing and send the switch's CONFIRM
        again; a new fault channel joins and asks again for the pages the
        guest waits for.  True then; False when postcopy is not under way
        or the source itself ended it."""
        pc = self._postcopy
        if pc is None or self._postcopy_done or isinstance(exc, (Cancelled, PostcopyLost)):
            return False
        if not isinstance(exc, (PeerError, TransportError)) and not self.chan.closed:
            try:  # the source learns why (a page refused, ...) before it reconnects
                async with asyncio.timeout(1.0), self._send_lock:
                    await self.chan.send(fr.Error(exc.code, one_line(exc)))
            except Exception:
                pass
        self.chan.close()
        self._stop_faults()
        while True:
            self.progress.message(f"postcopy paused: {one_line(exc)}")
            rec = self.result.setdefault("postcopy_recovery", {"pauses": 0, "causes": []})
            rec["pauses"] += 1
            rec["causes"].append(one_line(exc))
            chan = await self._postcopy_hold.wait(exc, self.hello.session, pc.total - pc.landed, self._address)
            try:
                await self._restart_postcopy(chan)
                break
            except MigrationError as again:  # broke again at once: hold again
                chan.close()
                exc = again
        self._fast_switching()
        self.progress.message(f"postcopy resumed: {pc.total - pc.landed} pages still missing")
        return True

    async def _restart_postcopy(self, chan) -> None:
        """On the recovery connection: the pages still missing and the
        switch's CONFIRM again; then a new fault channel may join."""
        pc = self._postcopy
        self._retired.append(self.chan)
        self.chan, self.machine = chan, chan.conn.machine
        chan.timeout = self.config.timeout_s
        missing = pc.missing()
        async with self._send_lock:
            for frame in announcements(missing, self.host.memory.npages):
                await chan.send(frame)
            await chan.send(self._switch_confirm)

    async def _end_postcopy(self, frame) -> None:
        """The source's last PASS_END: every page was sent, the last ones
        perhaps on the fault channel, whose thread may still be placing them."""
        pc = self._postcopy
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._all_landed.wait()
        except TimeoutError:
            raise ProtocolError(f"the source ended postcopy with {pc.total - pc.landed} pages not sent") from None
        self._stop_faults()
        self.host.vm.uffd = None
        pc.uffd.close()
        self._postcopy_done = True
        wrong = self.host.counters.get("guest.wrong_tag_accesses") - pc.wrong_before
        if wrong:
            # Every page is here and right now, but the guest already took
            # tag check faults that a correct migration never causes.
            self._fail(
                GuestFaulted(
                    f"the guest saw wrong tags {wrong} times: pages went live before their tags "
                    f"({self.strategy.name}: {self.strategy.postcopy_race})"
                )
            )
            self.result["guest_on"] = "destination"
        else:
            self.result["status"] = "completed"
        try:
            async with self._send_lock:
                await self.chan.send(fr.Resumed())
        except MigrationError:
            pass  # the source will ask again (RECOVER "postcopy"): we linger for it
        await self._linger_after_postcopy()

    async def _linger_after_postcopy(self) -> None:
        """Every page is here.  The source hangs up once it has read RESUMED;
        if that clean close does not come, RESUMED may have been lost with
        the link: for the hold time, answer the source's RECOVER "postcopy"
        with an empty list and RESUMED again (never a page: none is owed)."""
        try:
            await self.chan.recv(timeout=self.config.timeout_s)
        except TransportError as exc:
            if "closed the connection between frames" in str(exc):
                return
        except MigrationError:
            pass
        self.chan.close()
        chan = await self._postcopy_hold.accept(self.config.postcopy_hold_s)
        if chan is None:
            return
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await chan.send(fr.Postcopy([], b"", last=True))
                await chan.send(self._switch_confirm)
                if (await chan.recv()).type == T.PASS_END:
                    await chan.send(fr.Resumed())
        except (MigrationError, TimeoutError):
            pass
        finally:
            chan.close()

    def _stop_faults(self) -> None:
        sys.setswitchinterval(self._switch_interval)
        if self._faults is not None:
            self._faults.close()

    async def _on_error(self, frame) -> None:
        raise PeerError(f"source: {frame.message}", frame.code)

    async def _on_abort(self, frame) -> None:
        raise Cancelled(f"source aborted: {frame.reason}")

    # -- state and completion --------------------------------------------------------
    def _load_state(self, state: dict) -> None:
        """Check and stage vCPU + workload state; nothing runs until GO."""
        try:
            vcpus = [VcpuState.from_wire(v) for v in state["vcpus"]]
            wl = state["workload"]
            workload = self.host.make_workload(
                wl["name"], seed=int(wl["seed"]), vcpus=len(vcpus), params=dict(wl["params"])
            )
            workload.set_state(wl["state"])
            workload.set_device_state(dict(state["devices"]))
            self.host.vcpus.set_states(vcpus)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise ProtocolError(f"STATE is not a valid guest state: {type(exc).__name__}: {one_line(exc)}") from None
        self._staged_workload = workload

    def _loaded_state(self) -> dict:
        """The guest state as this side now holds it, read back from the
        vCPUs and the staged workload and devices (not the STATE message):
        what is validated is what will run."""
        host, workload = self.host, self._staged_workload
        return {
            "vcpus": [s.to_wire() for s in host.vcpus.get_states()],
            "workload": {
                "name": workload.name,
                "seed": workload.seed,
                "params": workload.params,
                "state": workload.get_state(),
            },
            "devices": workload.device_state(),
            "mte": host.vm.mte_enabled,
        }

    async def _refresh_loop(self) -> None:
        """Keep digesting what has landed while more arrives, so that at
        completion little is left to read (the downtime waits for it): a
        chunk is read soon after it lands, while it is likely still cached."""
        while True:
            await asyncio.sleep(0.02)
            if self._digest.pending(unread=False):
                self._start_refresh()

    def _start_refresh(self) -> None:
        """Re-digest stale chunks in a thread while more pages arrive."""
        if self._refresh_job is None or self._refresh_job.done():
            digest = self._digest
            self._refresh_job = asyncio.get_running_loop().run_in_executor(
                None, lambda: digest.refresh(digest.pending_chunks(unread=False), stop=self._refresh_stop)
            )

    def _start_final_digest(self, final_pass: int) -> None:
        """The source sends its state right after the final pass, then digests
        its own memory before COMPLETE.  Once every channel has delivered that
        pass nothing writes this RAM again, so digest it now, alongside the
        source, instead of after its COMPLETE (the downtime waits for both)."""

        async def run():
            await self._channels.await_final_pass(final_pass, self.hello.channels)
            self._channels.frozen = True  # a PAGES frame from now on is refused
            await self._final_digest()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda f: f.cancelled() or f.exception())  # read by _confirm when it matters
        self._early_digest = (final_pass, task)

    async def _final_digest(self) -> None:
        t = time.perf_counter()
        # No background refresh from here on: one started after the list
        # below is taken could clear a chunk's flags and leave it out.
        if self._refresher is not None:
            self._refresher.cancel()
        if self._refresh_job is not None:
            # Stop it after its current chunk rather than wait for its whole
            # list: the chunks it leaves are read below, in parallel threads.
            self._refresh_stop.set()
            await self._refresh_job
        # Nothing writes this RAM any more: a real host reads the tags it now
        # holds from the hardware into the view the digest reads, and the
        # chunks whose tags differ from that view are digested again.
        for a, b in await asyncio.get_running_loop().run_in_executor(None, self.host.refresh_tag_view):
            self._digest.mark_stale(a, b)
        stale, stale_bytes = len(self._digest.pending_chunks()), self._digest.stale_piece_bytes()
        # Every channel delivered the final pass: nothing writes this RAM any more.
        digest = self._digest
        await asyncio.get_running_loop().run_in_executor(None, lambda: digest.refresh_parallel(frozen=True))
        self.result["final_digest"] = {
            "stale_chunks": stale,
            "stale_mib": round(stale_bytes / 2**20, 1),
            "ms": _ms(time.perf_counter() - t),
        }

    async def _confirm(self, state, final_pass: int) -> None:
        early = self._early_digest
        if early is not None and early[0] == final_pass:
            await early[1]
        else:  # COMPLETE names another pass than the one before STATE: digest now
            if early is not None:
                early[1].cancel()
            self._channels.frozen = True
            await self._final_digest()
        if self._channels.failure.done():  # a data channel failed after delivering the final pass
            raise self._channels.failure.exception()
        self._no_torn_left()
        digest = self._digest
        sdigest = self._state_digest if state is not None else ""
        await self.chan.send(fr.Confirm(digest.data_digest(), digest.tag_digest(), sdigest, digest.chunk_crcs()))

    def _check_chunks(self, chunks) -> None:
        limit = chunk_count(self.host.memory.npages)
        bad = [c for c in chunks if c >= limit]
        if bad:
            raise ProtocolError(f"INSPECT names chunk {bad[0]}, outside guest RAM ({limit} chunks)")

    def _resume(self) -> None:
        host = self.host
        host.workload = self._staged_workload
        host.vcpus.workload = self._staged_workload
        host.vcpus.start()
        self.resumed = True
        self.result["guest_on"] = "destination"

    # -- later connections ----------------------------------------------------------
    async def _accept_more(self, listener) -> None:
        """Later connections: data channels of this migration (JOIN with its
        session), or anyone else, who is told the destination is busy."""
        pending: set = set()
        while True:
            sock, _ = await accept(listener)
            if len(pending) >= self.MAX_PENDING:
                sock.close()  # memory stays bounded: at most MAX_PENDING receive buffers for strangers
                continue
            tune(sock)
            task = asyncio.ensure_future(self._admit(sock))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _admit(self, sock) -> None:
        """A data channel's JOIN, a RECOVER in the in-doubt window (challenged
        and checked by ``DestRecovery.take``), or a refusal."""
        conn = Connection(data_dest_machine(), self.config.checksum, keyed=self._key is not None)
        try:
            io = await secure(sock, self._tls, True, min(self.config.timeout_s, 5.0))
        except MigrationError:
            sock.close()
            return
        chan = FrameChannel(sock, conn, min(self.config.timeout_s, 5.0), io=io)
        try:
            frame = await self._first_frame(chan)
            if frame.type == T.RECOVER and frame.decision == "postcopy":
                conn.ram_pages = self.host.memory.npages
                await self._postcopy_hold.take(frame, chan, self.hello)  # the channel is the control one now
                return
            if frame.type == T.RECOVER:
                await self._recovery.take(frame, chan, self.hello, lambda: self.resumed)
                return
            self._check_join(frame, chan)
            conn.ram_pages = self.host.memory.npages
            await chan.send(fr.Welcome(PROTOCOL_VERSION))
            if self._key is not None:  # bound to this migration's control connection
                conn.seal(self.chan.conn.stream_secret, "destination")
        except MigrationError as exc:
            await self._refuse(io, chan, exc)
            return
        # Hand the connection to a thread of its own (no bytes are buffered:
        # the source sends nothing before WELCOME).
        if frame.channel == self.hello.channels:
            conn.machine.local("faults")
            self._faults = DestFaultChannel(sock, conn, io, self.config.timeout_s)
            self._fault_history.append(self._faults)
            self._faults_joined.set()
            if self._postcopy is not None and not self._postcopy_done:  # postcopy resumed: it serves at once
                self._faults.start(self._postcopy)
            return
        self._channels.add(frame.channel, sock, conn, io)

    async def _first_frame(self, chan):
        hello = self.hello
        if (
            hello is not None
            and len(self._channels.lanes) >= hello.channels - 1
            and (self._fault_slot_taken or self.strategy.postcopy_mode is None)
            and not self._recovery.listening
            and not self._postcopy_hold.listening
        ):
            # Every data channel (and the fault channel, if any) is here: whoever this is, we are busy.
            raise ProtocolError("this destination is already receiving a migration")
        frame = await chan.recv()
        if frame.type == T.JOIN and self.hello is None and self._handshaking:
            # The source opens data channels right after AUTH, which we
            # may not have read yet: wait for the handshake to finish.
            async with asyncio.timeout(self.config.timeout_s):
                await self._ready.wait()
        return frame

    @property
    def _fault_slot_taken(self) -> bool:
        """A fault channel is here and alive (one that broke with the link
        is replaced when postcopy resumes)."""
        return self._faults is not None and not self._faults.closing

    def _check_join(self, frame, chan) -> None:
        """A JOIN must name this migration's session, a channel not yet here,
        and prove the key over our nonce."""
        hello = self.hello
        if frame.type == T.HELLO:
            raise ProtocolError("this destination is already receiving a migration")
        if frame.type != T.JOIN:  # ERROR or ABORT: legal in any state, but no JOIN
            raise ProtocolError(f"expected JOIN on a new connection, got {frame.type.name}")
        if hello is None or self.machine is None or self.machine.finished:
            raise (
                ProtocolError("this destination is already receiving a migration")
                if hello
                else ProtocolError("no migration to join")
            )
        if frame.session != hello.session or not 1 <= frame.channel <= hello.channels:
            raise ProtocolError(f"JOIN for channel {frame.channel} of an unknown session")
        if frame.channel == hello.channels:  # the one after the last data channel
            if self.strategy.postcopy_mode is None:
                raise ProtocolError(f"a fault channel, but strategy {self.strategy.name} cannot do postcopy")
            if not hello.postcopy:
                raise ProtocolError("a fault channel, but the source's HELLO did not say it may switch to postcopy")
            if self._fault_slot_taken:
                raise ProtocolError("the fault channel joined twice")
        elif frame.channel in self._channels.lanes:
            raise ProtocolError(f"data channel {frame.channel} joined twice")
        if self._key is not None and not auth.check(
            self._key, frame.proof, "join", frame.session, frame.channel, self._nonce
        ):
            raise AuthError(f"data channel {frame.channel} failed authentication")
        if chan._end > chan._start:
            raise ProtocolError("data arrived on a channel before its WELCOME")

    async def _refuse(self, io, chan, exc: MigrationError) -> None:
        code = "busy" if "already receiving" in str(exc) else exc.code
        try:
            async with asyncio.timeout(1.0):
                for b in chan.conn.send(fr.Error(code, one_line(exc))):  # sealed, if it was
                    await io.sendall(b)
        except (OSError, TimeoutError):
            pass
        chan.close()

    # -- failure and the end --------------------------------------------------------
    def _fail(self, exc: MigrationError) -> None:
        self.result["status"] = exc.status
        self.result["error"] = one_line(exc)
        self._error = exc
        self.progress.message(f"migration {exc.status}: {self.result['error']}")

    async def _on_failure(self, exc: MigrationError) -> None:
        if self._postcopy is not None and not self._postcopy_done:
            await self._postcopy_failed(exc)
            return
        if self._announced and self._postcopy is None and not isinstance(exc, (PeerError, Cancelled)):
            await self._unswitched(exc)
        # After CONFIRM, a broken or garbled stream may have carried GO:
        # only the source's own ERROR or ABORT says it kept the guest.
        if self.machine.state == DestState.AWAIT_GO and not isinstance(exc, (PeerError, Cancelled)):
            try:
                if await self._recovery.wait(exc, self.hello.session):
                    self.result["status"], self.result["error"] = "completed", None
            except MigrationError as final:
                self._fail(final)
        else:
            self._fail(exc)

    async def _unswitched(self, exc: MigrationError) -> None:
        """The switch was announced but failed before the guest resumed here:
        the source, which counts the guest as handed over, may ask (RECOVER
        "postcopy"); tell it that it never ran here, so it resumes its copy."""
        if not isinstance(exc, TransportError) and not self.chan.closed:
            try:
                async with asyncio.timeout(1.0):
                    await self.chan.send(fr.Error(exc.code, one_line(exc)))
            except Exception:
                pass
        self.chan.close()
        self.progress.message(
            f"the postcopy switch failed before the guest resumed here ({one_line(exc)}); waiting up to "
            f"{self.config.postcopy_hold_s:g} s to tell the source, which keeps the guest"
        )
        chan = await self._postcopy_hold.accept(self.config.postcopy_hold_s)
        if chan is None:
            return
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await chan.send(
                    fr.Error(NOT_RESUMED, f"the guest never resumed here ({one_line(exc)}); its copy is discarded")
                )
        except (MigrationError, TimeoutError):
            pass
        finally:
            chan.close()

    def _postcopy_lost(self) -> None:
        """This process ends with a guest that still lacks pages: it is lost
        here, whatever the reason; the source holds its paused copy."""
        self._stop_faults()
        pc = self._postcopy
        pc.uffd.close()  # vCPUs waiting for pages stop now, not at teardown's join timeout
        self.result["status"] = "postcopy-lost"
        self.result["guest_on"] = (
            f"nowhere here: the guest ran here from the postcopy switch with {pc.total - pc.landed} pages "
            f"missing (its vCPUs cannot proceed) and ends with this process; the source holds its paused copy "
            f"as of the switch"
        )

    async def _postcopy_failed(self, exc: MigrationError) -> None:
        """After the switch, no resume (the hold ran out, or the source ended
        postcopy): the guest here is lost."""
        self._fail(exc)
        self._postcopy_lost()
        if not isinstance(exc, (PeerError, TransportError)) and not self.chan.closed:
            try:
                async with asyncio.timeout(1.0), self._send_lock:
                    await self.chan.send(fr.Error(exc.code, one_line(exc)))
            except Exception:
                pass

    async def _clean_up(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._refresher is not None:
            self._refresher.cancel()
        if self._early_digest is not None:
            self._early_digest[1].cancel()
        if not self.resumed:
            await self._report_failure()
            await self.chan.close_gracefully(FAILURE_CLOSE_S)
        self.chan.close()
        self._channels.close(self.stats)
        if self._faults is not None:
            self._faults.close()
        if self.strategy is not None:
            self.strategy.close()

    async def _report_failure(self) -> None:
        """Tell the source why (unless it told us), then discard what arrived."""
        err = self._error
        if (
            err is not None
            and not isinstance(err, (PeerError, Cancelled))
            and not self.chan.closed
            and self.machine is not None
            and not self.machine.finished
            and not isinstance(err, HandshakeMismatch)
        ):
            try:
                async with asyncio.timeout(1.0):
                    await self.chan.send(fr.Error(err.code, one_line(err)))
            except Exception:
                pass
        if self.machine is not None:
            self.machine.fail("discarding the partial guest")
        self.result["guest_on"] = "nowhere (partial state discarded)"

    def _fill_stats(self) -> None:
        res, s, chan = self.result, self.stats, self.chan
        res["total_time_ms"] = _ms(time.perf_counter() - self._started)
        res["counters"] = type(self.host.counters).delta(self.host.counters.snapshot(), self._counters_before)
        if self._postcopy is not None:
            res["postcopy"] = self._postcopy.report(res["counters"])
            # the guest's progress here (the simulator counts it)
            res["postcopy"]["guest_pages_touched"] = getattr(self.host.vcpus, "pages_touched", None)
        old = self._retired
        faults = self._fault_history
        received = (
            chan.bytes_received
            + self._channels.bytes_received()
            + sum(c.bytes_received for c in old)
            + sum(f.bytes_received for f in faults)
        )
        res["ram"].update(
            transferred_bytes=received,
            zero_pages=s.zero_pages,
            normal_pages=s.normal_pages,
            normal_bytes=s.data_bytes,
            spliced_bytes=s.spliced_bytes,
        )
        res["tags"].update(tagged_pages=s.tagged_pages, raw_bytes=s.tag_raw, wire_bytes=s.tag_wire)
        res["wire"].update(
            bytes_sent=chan.bytes_sent + sum(c.bytes_sent for c in old),
            bytes_received=received,
            protection=protection(self._tls, self._key),
            authenticated_frames=chan.conn.authenticated_frames
            + self._channels.authenticated_frames()
            + sum(c.conn.authenticated_frames for c in old)
            + sum(f.authenticated_frames for f in faults),
            channels=1 + len(self._channels.lanes),
            data_bytes=s.data_wire,
            tag_bytes=s.tag_wire,
        )
