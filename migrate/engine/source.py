"""The source VMM's migration engine: handshake, bulk pass, dirty passes to
convergence, stop-and-copy, completion -- and, whatever goes wrong, the guest
resumes here with memory and tags untouched.

``SourceVmm.migrate`` reads like QEMU's migration thread: connect, bulk pass,
dirty passes until the rest fits in the downtime, switch over (pause, final
pass, state), complete (digests, CONFIRM, validation), hand over (GO,
RESUMED), finish.  Passes are sent by ``passes.PassSender``, dirty pages
found by ``dirty.DirtyLog``, the in-doubt window after GO is
``recovery.SourceRecovery``'s."""

import asyncio
import bisect
import itertools
import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_threads
from dataclasses import dataclass

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from hosts.writewatch import WatchUnavailable
from migrate.engine.bitmaps import runs
from migrate.engine.convergence import AutoConverge, DowntimeOrPassLimit
from migrate.engine.digest import CHUNK_PAGES, PIECE_PAGES, MemoryDigest, chunk_count, page_detail, state_digest
from migrate.engine.digest_keeper import DigestKeeper
from migrate.engine.dirty import DirtyLog, union
from migrate.engine.handshake import introduce
from migrate.engine.lanes import SendLane, pages_channels
from migrate.engine.pages import BatchBuilder
from migrate.engine.passes import PassSender, PeerWatch
from migrate.engine.postcopy import BACKGROUND_BACKLOG, SourcePostcopy, announcements, mixed_chunks
from migrate.engine.postcopy_recovery import NotResumed, ResumedHere, SourcePostcopyHold
from migrate.engine.progress import Progress
from migrate.engine.recovery import SourceRecovery
from migrate.engine.report import empty_result, protection
from migrate.engine.validate import Validation, compare_detail, differing_chunks
from migrate.errors import (
    Cancelled,
    DestinationGone,
    InDoubt,
    MigrationError,
    PeerError,
    ProtocolError,
    TransportError,
    ValidationFailed,
    one_line,
)
from migrate.net import tls
from migrate.net.ratelimit import RateLimiter
from migrate.net.threads import LoopThread
from migrate.net.transport import FrameChannel, bound_backlog, congestion_of, connect, secure, within_host
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.compression import Compressor
from migrate.protocol.machine import Connection, SourceState, data_source_machine, source_machine
from migrate.strategies import get as get_strategy

log = logging.getLogger("migrate.engine.source")

#: the write watch protects RAM this much at a time, in its own thread, ahead
#: of the bulk pass (32 MiB of 4 KiB pages: about half a millisecond; all of
#: a GiB at once held the first page back 17-22 ms)
WATCH_STEP = 32 << 20


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def dirty_pass_bandwidth(passes: list[dict]) -> float | None:
    """Guest bytes per second over the last dirty pass that sent real data,
    the rate the convergence estimate divides by.  The final pass is a dirty
    pass: scattered pages, each with its own store and tag call, at about
    half the rate of the bulk pass's whole chunks, so the bulk pass does not
    predict it (None until a dirty pass ran: the estimate is then unknown and
    precopy goes on, unless nothing is left to send)."""
    for p in reversed(passes):
        if p["pass"] > 0 and p["seconds"] > 0 and p["pages"]:
            pages = p["normal_pages"] or p["pages"]
            return pages * PAGE_SIZE / p["seconds"]
    return None


@dataclass
class _Clock:
    """perf_counter() marks of one migration, for the result's timings."""

    start: float = 0.0
    pause: float = 0.0  # the guest stopped here
    memory_sent: float = 0.0  # the final pass went out
    state_sent: float = 0.0
    done: float = 0.0  # the guest runs on the destination: the migration's end, before the teardown


class SourceVmm:
    def __init__(self, host, config, scenario: str = "custom", progress: Progress | None = None):
        self.host = host
        self.config = config
        self.scenario = scenario
        self.progress = progress or Progress(False)
        self.result = empty_result(scenario, config.strategy)
        self.handed_over = False  # GO was sent: from then on this side never resumes the guest
        self.machine = None  # the control connection's state machine
        self.strategy = None
        self._clock = _Clock()
        self._address: tuple[str, int] | None = None
        self._error: MigrationError | None = None
        # -- connect
        self._tls = None
        self._chan: FrameChannel | None = None  # the control connection (channel 0)
        self._session: str | None = None
        self._dest_nonce = b""  # the destination's, from WELCOME: data channels' JOIN proofs name it
        self._recovery: SourceRecovery | None = None
        # -- precopy
        self._peer = PeerWatch()
        self._dirty_log = DirtyLog(host, self.result)
        self._sender = PassSender(self._peer, self._dirty_log, self.progress, self.result)
        self._digest: MemoryDigest | None = None
        self._digest_keeper: DigestKeeper | None = None
        #: validate = "digest": the host's write watch and the digest it keeps
        #: up to date (None where the host cannot watch: see _watch_note)
        self._watch = None
        self._tag_watch = None  # the same over the tag storage, where the host has one
        self._watched: MemoryDigest | None = None
        self._watch_note: str | None = None
        self._bulk = None  # while the bulk pass runs: what _bulk_front needs
        self._policy: DowntimeOrPassLimit | None = None
        self._converge: AutoConverge | None = None
        self._dirty_passes = 0
        self._dirty = b""  # the last harvest, not sent yet
        self._tags_only = b""  # pages whose tags alone changed, not sent yet
        self._remaining = 0  # bytes the last harvest left to send
        # -- switch over and completion
        self._paused_here = False
        self._torn_pages = 0  # pages of frames the destination found torn (the next harvest explained them)
        self._digest_job: asyncio.Future | None = None  # the final digest, while the final pass goes out
        self._digest_reading: Future | None = None  # its thread's work, which no cancel stops
        self._state: dict | None = None  # vCPU, workload and device state, sent with STATE
        # -- postcopy
        self._postcopy_reason: str | None = None  # why precopy gave way to postcopy
        self._discarded_ahead: dict | None = None  # what the destination discarded before the pause
        self._switched = False  # POSTCOPY announced: the guest runs there, its missing pages are here
        self._fault_chan: FrameChannel | None = None  # postcopy: REQUESTs and the pages they ask for
        self.postcopy_retries = 0  # reconnections after a broken postcopy without the operator (--retry)
        self._fault_chans: list[FrameChannel] = []  # every fault channel, for the byte counts
        self._recovered_chans: list[FrameChannel] = []  # postcopy's recovery connections, for the byte counts

    @property
    def lanes(self) -> list[SendLane]:
        return self._sender.lanes

    @property
    def passes(self) -> list[dict]:
        """One record per pass sent."""
        return self._sender.passes

    # -- public ---------------------------------------------------------------------
    async def migrate(self, address: tuple[str, int]) -> dict:
        """Migrate the guest to the destination at ``address``; returns the result."""
        self.result["ram"]["total_bytes"] = self.host.memory.size
        self._clock.start = time.perf_counter()
        counters_before = self.host.counters.snapshot()
        self._touched_before = getattr(self.host.vcpus, "pages_touched", None)  # the simulator counts them
        self._address = address
        try:
            await self._connect(address)
            self._start_precopy()
            await self._bulk_pass()
            await self._caught_up()
            while not self._precopy_done():
                await self._dirty_pass()
                await self._caught_up()
            if self._postcopy_reason:
                await self._postcopy()
            else:
                await self._switch_over()
                await self._complete()
                await self._hand_over()
        except (asyncio.CancelledError, KeyboardInterrupt):
            self._fail(Cancelled("cancelled by the user"))
        except InDoubt as exc:
            self._fail(exc)
            self.result["guest_on"] = "unknown (in doubt: see the error)"
        except MigrationError as exc:
            self._fail(await self._peer_words(exc))
        except Exception as exc:  # a bug: still never lose the guest
            log.exception("internal error")
            self._fail(MigrationError(f"internal error: {type(exc).__name__}: {one_line(exc)}"))
        finally:
            await self._finish()
            self._fill_stats(counters_before)
        return self.result

    async def _peer_words(self, exc: MigrationError) -> MigrationError:
        """A broken connection may be the destination hanging up right after
        saying why (its ERROR still in flight): its words, if they come."""
        if isinstance(exc, TransportError):
            try:
                await self._peer.words(0.5)
            except PeerError as said:
                return said
            except MigrationError:
                pass
        return exc

    # -- setup ----------------------------------------------------------------------
    async def _connect(self, address) -> None:
        """The control connection (TLS if configured), the handshake, then the
        data channels, each on a thread of its own."""
        host, cfg = self.host, self.config
        key = auth.load_key(cfg.psk_file)  # a missing or short key fails here, before any connection
        sock = await connect(*address, cfg.timeout_s, cfg.tcp_congestion)
        self.result["wire"]["congestion_control"] = congestion_of(sock)
        conn = Connection(source_machine(), cfg.checksum, keyed=key is not None)
        conn.ram_pages = host.memory.npages  # bounds the destination's page REQUESTs (postcopy)
        self.machine = conn.machine
        limiter = RateLimiter(cfg.max_bandwidth) if cfg.max_bandwidth else None
        self._tls = tls.from_options(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        io = await secure(sock, self._tls, False, cfg.timeout_s)
        chan = self._chan = FrameChannel(sock, conn, cfg.timeout_s, limiter, io)
        self.strategy = get_strategy(cfg.strategy)(host, cfg)
        session = self._session = secrets.token_hex(8)
        self._recovery = SourceRecovery(cfg, self._tls, session, self.result, self.progress)
        welcome = await introduce(chan, host, cfg, self.strategy, session, self._tls)
        self._dest_nonce = welcome.nonce
        compressor = Compressor(cfg.compression, cfg.max_bandwidth)
        self.lanes.append(SendLane(0, chan, self._new_builder(compressor), cfg.batch_pages))
        self._sender.carrying = pages_channels(cfg.channels, cfg.channel_count, within_host(sock), welcome.ram_ready)
        for i in range(1, cfg.channel_count):
            thread = LoopThread(f"channel{i}")
            self._sender.threads.append(thread)
            self.lanes.append(await thread.submit(self._open_lane(i, address, session, limiter)))
        self.result["setup_time_ms"] = _ms(time.perf_counter() - self._clock.start)

    async def _open_lane(self, index: int, address, session: str, limiter) -> SendLane:
        """Runs on the channel's own thread: a data channel joined."""
        cfg = self.config
        chan = await self._join(index, address, session, limiter, "data channel")
        compressor = Compressor(cfg.compression, cfg.max_bandwidth)
        return SendLane(index, chan, self._new_builder(compressor), cfg.batch_pages)

    async def _join(self, index: int, address, session: str, limiter, what: str) -> FrameChannel:
        """Connect, JOIN, wait for WELCOME: an extra connection of this migration."""
        cfg = self.config
        sock = await connect(*address, cfg.timeout_s, cfg.tcp_congestion)
        io = await secure(sock, self._tls, False, cfg.timeout_s)
        key = auth.load_key(cfg.psk_file)
        conn = Connection(data_source_machine(index), cfg.checksum, keyed=key is not None)
        conn.ram_pages = self.host.memory.npages  # bounds the fault channel's REQUESTs
        chan = FrameChannel(sock, conn, cfg.timeout_s, limiter, io)
        await chan.send(
            fr.Join(session, index, auth.proof(key, "join", session, index, self._dest_nonce) if key else b"")
        )
        reply = await chan.recv()
        if reply.type == fr.FrameType.ERROR:
            chan.close()
            raise PeerError(f"destination refused {what} {index}: {reply.message}", reply.code)
        if key is not None:  # bound to this migration's control connection
            conn.seal(self._chan.conn.stream_secret, "source")
        return chan

    async def _join_faults(self) -> FrameChannel:
        """The postcopy fault channel: the one after the last data channel."""
        faults = await self._join(
            self.config.channel_count, self._address, self._session, None, "the fault channel, channel"
        )
        faults.conn.machine.local("faults")
        self._fault_chans.append(faults)
        return faults

    def _new_builder(self, compressor) -> BatchBuilder:
        """A channel's batch builder; with checked frames (--checksum full) it
        puts each batch's CRCs in the frame (see BatchBuilder: when it copies
        a batch first, and when it sends it live)."""
        builder = BatchBuilder(
            self.strategy,
            compressor,
            self.config.batch_pages,
            checked=self.config.checksum == "full",
            # No live frames (see Pages.live) with a MAC on every frame, where
            # a torn one would read as tampered, nor where the guest may
            # switch to postcopy: its validation skips the chunks that hold a
            # postcopy page, so a page of a torn frame that was excused but
            # corrupt could go unseen there.
            snapshot_running=bool(self.config.psk_file) or self.config.postcopy,
        )
        builder.guest_runs = not self._paused_here
        return builder

    def _paused(self) -> None:
        """The guest is paused here: what the builders send from its memory
        can no longer tear."""
        self.host.vcpus.pause()
        self._paused_here = True
        for lane in self.lanes:
            lane.builder.guest_runs = False
            if lane.builder.digest is self._watched:
                # the watched digest is read at the pause from here on
                lane.builder.digest = None

    def _start_precopy(self) -> None:
        """Dirty logging, the validation digest and the convergence policy:
        all on before the first page is read."""
        cfg = self.config
        if cfg.validate == "tracked":
            # Opt-in: the digest is kept up to date from here on, in the
            # background: every write after a chunk is read is in a later
            # dirty harvest, which marks the chunk stale (see DirtyLog), so
            # after the pause only the chunks dirtied since are read again.
            # It trusts the dirty tracking it is meant to check.
            self._digest = MemoryDigest(self.host.memory, compute=False)
            for lane in self.lanes:
                lane.builder.digest = self._digest
            # With checked frames the bulk pass digests the chunks it sends
            # (BatchBuilder), and the background keeper starts after it.
            if not self.lanes[0].builder.checked:
                self._digest_keeper = DigestKeeper(self._digest)
        elif cfg.validate == "digest":
            self._start_write_watch()
        else:
            self._watch_note = f"not used with validate = {cfg.validate}"
        self._dirty_log.start(self.strategy, self._digest)
        self.strategy.setup_source()
        self._peer.listen(self._chan)
        self._policy = DowntimeOrPassLimit(cfg.downtime_limit_ms, cfg.max_passes)
        if cfg.auto_converge:
            self._converge = AutoConverge(cfg.throttle_initial, cfg.throttle_increment, cfg.throttle_max)

    def _start_write_watch(self) -> None:
        """The default validation digest: kept up to date from the host's
        write watch -- its page tables, not KVM's dirty log, the VMM's
        bitmap or a strategy -- by a keeper that reads RAM while the guest
        runs, so that after the pause only what was written since is read
        again.  Where the host cannot watch, all of RAM is re-read then."""
        try:
            self._watch = self.host.watch_writes(WATCH_STEP)
        except WatchUnavailable as exc:
            self._watch_note = str(exc)
            return
        self._watched = MemoryDigest(self.host.memory, compute=False)
        try:
            self._tag_watch = self.host.watch_tag_writes()
            self._watched.remember_tagged()
        except WatchUnavailable:
            pass  # every chunk's tags are read at the pause instead
        # The bulk pass's checked frames CRC each whole chunk they read from
        # guest RAM: those CRCs are the chunks' digests as they were then
        # (what the guest writes after, the watch reports), so a chunk
        # nobody writes is read once, by the sender, not again at the pause.
        for lane in self.lanes:
            if lane.builder.checked:
                lane.builder.digest, lane.builder.digest_pieces = self._watched, False
                lane.builder.watched = self._protected
        self._digest_keeper = DigestKeeper(
            self._watched, self._watch, front=self._bulk_front, tag_watch=self._tag_watch
        )
        if not self.config.postcopy:  # (after a switch the guest writes on the destination)
            for lane in self.lanes:
                lane.builder.guest_quiet = self._digest_keeper.quiet

    def _protected(self, first: int, end: int) -> bool:
        """Whether the write watch sees the pages' writes from now on; it
        protects RAM from its start, WATCH_STEP at a time, ahead of the
        bulk pass (which waits here the first time round)."""
        watch = self._watch
        return watch is not None and watch.wait_protected(end * PAGE_SIZE)

    def _bulk_front(self) -> int | None:
        """The first chunk the bulk pass has not sent yet (about: each lane
        goes through its stripes in order), or None outside it."""
        bulk = self._bulk
        if bulk is None:
            return None if self.passes else 0
        ends, starts, before = bulk
        done = sum(lane.pages_done - s0 for lane, s0 in zip(self.lanes, before))
        i = bisect.bisect_right(ends, done)
        if i >= len(starts):
            return None
        front = (starts[i] + done - (ends[i - 1] if i else 0)) // CHUNK_PAGES
        watch = self._watch
        # (a chunk read before the watch protects it could be written unseen)
        return front if watch is None else min(front, watch.protected // (CHUNK_PAGES * PAGE_SIZE))

    def _close_write_watch(self) -> None:
        if self._watch is not None:
            self.host.unwatch_writes(self._watch)
            self._watch = None
        if self._tag_watch is not None:
            self._tag_watch.close()
            self._tag_watch = None

    # -- precopy --------------------------------------------------------------------
    async def _bulk_pass(self) -> None:
        """Pass 0: every populated page."""
        ranges = self.host.memory.populated_ranges()
        # for _bulk_front: where each range ends in the count of pages sent
        self._bulk = (
            list(itertools.accumulate(b - a for a, b in ranges)),
            [a for a, _ in ranges],
            [lane.pages_done for lane in self.lanes],
        )
        try:
            await self._sender.send(0, ranges)
        finally:
            self._bulk = None
        if self._digest is not None and self._digest_keeper is None:
            self._digest_keeper = DigestKeeper(self._digest)

    async def _caught_up(self) -> None:
        """Wait for the destination's APPLIED of the pass just sent: the
        socket buffers may still hold much of it, and a guest paused while
        the destination works through them would wait for that too."""
        record = self.passes[-1]
        waited = await self._peer.applied_by(record["pass"], self.config.timeout_s)
        record["applied_wait_s"] = round(waited, 6)

    def _precopy_done(self) -> bool:
        """Harvest what the guest dirtied and ask the policy whether the rest
        fits in the downtime (or precopy has to stop anyway)."""
        self._dirty = self._dirty_log.harvest()
        self._check_torn()
        self._tags_only = union(self._tags_only, self._dirty_log.harvest_tags_only(self._dirty))
        remaining = self._dirty.count(1) * PAGE_SIZE + self._tags_only.count(1) * PACKED_TAGS_PER_PAGE
        bandwidth = dirty_pass_bandwidth(self.passes)
        decision = self._policy.decide(self._dirty_passes, remaining, bandwidth)
        self.result["expected_downtime_ms"] = self._policy.expected_downtime_ms(remaining, bandwidth)
        self._remaining = remaining
        if self.config.postcopy and not (decision.stop and not decision.forced):  # converged: stop-and-copy
            if decision.stop:
                self._postcopy_reason = f"precopy will not converge ({decision.reason})"
            elif self._dirty_passes >= self.config.postcopy_after_passes:
                self._postcopy_reason = f"postcopy after {self._dirty_passes} dirty passes (--postcopy-after-passes)"
            if self._postcopy_reason:
                self.result["convergence"] = {"policy": "postcopy", "reason": self._postcopy_reason, "forced": False}
                self.progress.message(f"postcopy: {self._postcopy_reason}")
                return True
        if decision.stop:
            self.result["convergence"] = {
                "policy": self._policy.name,
                "reason": decision.reason,
                "forced": decision.forced,
            }
            self.progress.message(f"stop-and-copy: {decision.reason}")
        return decision.stop

    def _check_torn(self) -> None:
        """Every frame the destination found torn (its data failed the CRC:
        see Pages.live) must hold a page of the harvest just taken, which
        goes again; one that does not was corrupted, not torn.  (Validation
        at the end compares every chunk apart from this -- a migration that
        may go postcopy sends no live frame -- and a write the dirty
        tracking missed fails here too, when it tore a frame.)"""
        torn, self._peer.torn = self._peer.torn, []
        npages = self.host.memory.npages
        for first, count in torn:
            if first + count > npages or self._dirty.find(1, first, first + count) < 0:
                raise ProtocolError(
                    f"destination: PAGES frame of pages {first}..{first + count - 1} failed its data checksum, "
                    "and no page of it is in the next dirty harvest: corrupt on the wire, "
                    "or written by something the dirty tracking missed"
                )
        self._torn_pages += sum(count for _, count in torn)

    async def _dirty_pass(self) -> None:
        """Send what the last harvest found (throttling the vCPUs first, with
        auto-converge, from the second dirty pass on)."""
        if self._converge is not None and self._dirty_passes >= 1:
            throttle = self._converge.after_pass(self._remaining)
            if throttle != self.host.vcpus.throttle:
                self.host.vcpus.set_throttle(throttle)
                self.progress.message(f"auto-converge: vCPUs throttled to {throttle:.0%}")
        self._dirty_passes += 1
        await self._sender.send(self._dirty_passes, list(runs(self._dirty, 1)), tags_only=self._tags_only)
        self._tags_only = b""

    # -- stop and copy --------------------------------------------------------------
    async def _switch_over(self) -> None:
        """Pause the guest; send what it dirtied since the last pass, then its state."""
        self._clock.pause = time.perf_counter()
        self._paused()
        self.machine.local("pause")
        # The pages harvested for the last decision were never sent:
        # they go out with whatever the guest dirtied since.
        final = union(self._dirty, self._dirty_log.harvest())
        self._tags_only = union(self._tags_only, self._dirty_log.harvest_tags_only(final))
        # Memory is frozen: digest it in threads (CRC releases the GIL)
        # while the last pages go out.
        self._start_final_digest()
        final_pass = self._dirty_passes + 1
        await self._sender.send(final_pass, list(runs(final, 1)), final=True, tags_only=self._tags_only)
        self._clock.memory_sent = time.perf_counter()
        self._state = self._collect_state()
        await self._chan.send(fr.State(self._state))
        self._clock.state_sent = time.perf_counter()

    async def _postcopy(self) -> None:
        """Pause; STATE; announce the pages the destination lacks (it
        resumes the guest at the last announcement); then the table and the
        pages, requested ones first.  From the announcement on the guest
        runs there and is never resumed here: this paused copy is the only
        whole one until the last page has landed."""
        # The fault channel first, while the guest still runs here: a
        # refusal or a broken link leaves it running, and the switch does not
        # wait for a connection.
        faults = self._fault_chan = await self._join_faults()
        await self._discard_ahead()
        self._clock.pause = time.perf_counter()
        self._paused()
        if self._digest_keeper is not None:
            # the guest is paused here: what the keeper has left is read
            # with the rest at the end, not beside the answers to faults
            self._digest_keeper.stop_now()
        self.machine.local("pause")
        self._peer.stop()  # the postcopy reader takes the control connection's replies
        missing = self._postcopy_pages()
        ranges = [(a, b - a) for a, b in runs(missing, 1)]  # (first page, count)
        self._state = self._collect_state()
        await self._chan.send(fr.State(self._state))
        builders = (self.lanes[0].builder, self._new_builder(Compressor(self.config.compression)))
        pc = SourcePostcopy(
            self._chan, faults, builders, self.host.memory, ranges, self._dirty_passes + 1, self.progress
        )
        bound_backlog(self._chan.sock, BACKGROUND_BACKLOG)  # see BACKGROUND_BACKLOG
        await pc.announce()
        handed = time.perf_counter()  # the guest is the destination's from here
        self._switched = self.handed_over = True
        self.result["guest_on"] = "destination (postcopy: its missing pages still here)"
        switched = await self._run_postcopy(pc)
        # The independent re-read of this frozen memory waits until every
        # page is sent: on two cores it would slow the answers to the guest's
        # faults, and its result is needed only for the verdict.
        self._start_final_digest()
        validation = await self._validate_postcopy(pc.confirm.result(), ranges)
        done = time.perf_counter()
        self.result["postcopy"] = {
            "reason": self._postcopy_reason,
            "switch_downtime_ms": self.result["downtime_ms"],
            "pages_discarded_ahead": (self._discarded_ahead or {}).get("pages", 0),
            "discard_ahead_ms": (self._discarded_ahead or {}).get("ms"),
            "pages": pc.total,
            "pages_requested": pc.requested_pages,
            "requests": pc.requests,
            "fault_channel_bytes": sum(c.bytes_sent for c in self._fault_chans),
            "pages_resent": pc.resent,
            # from the hand-over, not the CONFIRM: a short postcopy may send its last page before that arrives
            "last_page_ms": _ms(pc.last_page_at - handed) if pc.last_page_at else 0.0,
            "total_after_switch_ms": _ms(done - switched),
        }
        self.result["validation"] = validation.to_dict()
        if not validation.ok:
            raise ValidationFailed(
                f"{validation.summary()} -- found after the postcopy switch: the guest runs on the destination"
            )
        self._clock.done = done
        self.result["status"] = "completed"
        self.result["guest_on"] = "destination"

    def _postcopy_pages(self) -> bytes:
        """1 per page postcopy must send: known dirty, dirtied since (the
        log harvested), or with tags alone changed."""
        dirty = union(self._dirty, self._dirty_log.harvest())
        return union(dirty, union(self._tags_only, self._dirty_log.harvest_tags_only(dirty)))

    async def _discard_ahead(self) -> None:
        """MISSING mode, while the guest still runs here: announce the pages it dirtied
        since the last pass (POSTCOPY without a table, in precopy), and wait
        for the destination's APPLIED of the postcopy pass, sent once it has
        discarded them.  Discarding is a system call per range (3,400 ranges,
        ~20 ms, for a hot-set guest): done now, the switch discards only
        what the guest dirtied in between.  The pages stay in the dirty set,
        so the switch announces them again with the rest."""
        if self.strategy.postcopy_mode != "missing":
            return  # MINOR mode unmaps at the switch, after the destination's digest (see dest._discard_ahead)
        t = time.perf_counter()
        self._dirty = self._postcopy_pages()
        ranges = [(a, b - a) for a, b in runs(self._dirty, 1)]
        for frame in announcements(ranges, self.host.memory.npages):
            await self._chan.send(frame)
        await self._peer.applied_by(self._dirty_passes + 1, self.config.timeout_s)
        self._discarded_ahead = {"pages": sum(c for _, c in ranges), "ms": _ms(time.perf_counter() - t)}

    async def _run_postcopy(self, pc: SourcePostcopy) -> float:
        """Send the missing pages until the destination says RESUMED; a broken
        link pauses the migration until a recovery connection resumes it
        (postcopy_recovery).  Returns when the switch was confirmed."""
        switched = None
        hold = None
        while True:
            run = asyncio.ensure_future(pc.run())
            try:
                await asyncio.wait({run, pc.confirm}, return_when=asyncio.FIRST_COMPLETED)
                if pc.confirm.done() and switched is None:
                    switched = time.perf_counter()
                    self.result["downtime_ms"] = _ms(switched - self._clock.pause)
                await run
                break
            except MigrationError as exc:
                self._chan.close()
                if hold is None:
                    hold = SourcePostcopyHold(
                        self.config,
                        self._tls,
                        self._session,
                        self._address,
                        self.host.memory.npages,
                        self.postcopy_retries,
                        self.result,
                    )
                try:
                    chan, missing = await hold.reconnect(exc, pc.announced(), pc.total - pc.sent)
                except (ResumedHere, NotResumed):
                    # The operator's word that the destination is dead, or the
                    # destination's that it never ran the guest: it goes on
                    # here as it was paused.
                    self._switched = self.handed_over = False
                    raise
                chan.limiter = self._chan.limiter  # --max-bandwidth holds on the new connection too
                self._recovered_chans.append(chan)
                self._chan, self.machine = chan, chan.conn.machine
                if self._fault_chan is not None:
                    self._fault_chan.close()
                    self._fault_chan = None
                if missing:  # a new fault channel, bound to the recovery connection as the first to the control one
                    try:
                        self._fault_chan = await self._join_faults()
                    except MigrationError:
                        chan.close()  # this round's pc.run() fails at once, and the source holds again
                pc.resume(chan, self._fault_chan, missing)
                self.progress.message(f"postcopy resumed: {sum(c for _, c in missing)} pages still to send")
            finally:
                if not run.done():
                    run.cancel()
        self._chan.close()  # RESUMED read: the destination stops waiting for a recovery
        if switched is None:  # the switch's CONFIRM came only on a recovery connection
            switched = time.perf_counter()
            self.result["downtime_ms"] = _ms(switched - self._clock.pause)
        return switched

    async def _validate_postcopy(self, confirm, ranges) -> Validation:
        """What the destination held at the switch against this side's frozen
        memory, chunk by chunk, except the chunks holding a page fetched in
        postcopy (each of those pages is checked against the table as it
        lands, and the destination fails on any difference)."""
        digest, memory = await self._digest_job, self.host.memory
        nchunks = chunk_count(memory.npages)
        try:
            their_data, their_tags = MemoryDigest.split_chunk_crcs(confirm.chunk_crcs, nchunks)
        except ValueError as exc:
            raise ProtocolError(f"CONFIRM: {exc}") from None
        skipped = mixed_chunks(ranges)
        differ = [
            c for c in differing_chunks(digest.data_crcs, digest.tag_crcs, their_data, their_tags) if c not in skipped
        ]
        validation = Validation(
            "postcopy",
            pages_checked=memory.npages,
            compared=(
                f"per-chunk CRCs of the paused source's RAM and tags, read again after the pause (trusting no "
                f"dirty tracking), against the destination's digest at the switch, for the "
                f"{nchunks - len(skipped)} chunks without a postcopy page; each of the "
                f"{sum(c for _, c in ranges)} pages fetched in postcopy checked as it landed against the "
                f"paused source's CRCs of its data and tags; the other pages of the {len(skipped)} chunks "
                f"holding those pages are not compared; vCPU registers as loaded on the destination"
            ),
        )
        validation.state_ok = confirm.state_digest == state_digest(self._state)
        for c in differ:
            if digest.data_crcs[c] != their_data[c]:
                validation.data_mismatches += 1
            if digest.tag_crcs[c] != their_tags[c]:
                validation.tag_mismatches += 1
            if len(validation.first_mismatches) < 10:
                validation.first_mismatches.append({"chunk": c})
        return validation

    def _collect_state(self) -> dict:
        host = self.host
        return {
            "vcpus": [s.to_wire() for s in host.vcpus.get_states()],
            "workload": {
                "name": host.workload.name,
                "seed": host.workload.seed,
                "params": host.workload.params,
                "state": host.workload.get_state(),
            },
            # what the emulated devices really hold; {} when the guest has none
            "devices": host.workload.device_state(),
            "mte": host.vm.mte_enabled,
        }

    def _start_final_digest(self) -> None:
        """Begin the source's digest of its frozen memory at once, in a
        thread, from the kernel's memory and tag storage alone, so that no
        bug of the dirty log, the VMM's bitmap or a strategy can hide in it:
        by default the one the keeper kept from the host's write watch,
        brought up to date; without a watch (or with ``validate = "reread"``)
        a new one, all RAM read (chunks never populated are settled without
        reading); with ``validate = "tracked"`` the one kept up to date from
        the harvests.  ``_digest_job`` gives it."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="final-digest")
        self._digest_reading = pool.submit(self._read_frozen_memory, time.perf_counter())
        pool.shutdown(wait=False)  # its thread ends with this job
        self._digest_job = asyncio.ensure_future(self._final_digest(asyncio.wrap_future(self._digest_reading)))

    def _read_frozen_memory(self, asked_at: float) -> tuple[MemoryDigest, dict]:
        """In a thread, from the moment the memory froze: nothing here waits
        for the event loop, which is busy sending the last pages."""
        if self._digest_keeper is not None:
            self._digest_keeper.stop_now()  # not two threads on one chunk
        independent = self._digest is None
        # (the watch stays open until _finish: closing it unprotects RAM's
        # page tables, 13 ms a GiB, and it is no use to the guest meanwhile)
        digest, taken = self._watched_digest_at_pause()
        watched = digest is not None
        if not watched:
            # Taken once over frozen memory: one CRC call a chunk, no pieces kept.
            digest = MemoryDigest(self.host.memory, compute=False, pieces=False) if independent else self._digest
            taken = "re-read after the pause" if independent else "kept from the dirty-log harvests"
        # A real host's tags are in the hardware: read them into the view the
        # digest reads, now that the guest is paused (the simulator's view is
        # its tag storage: nothing changes).
        for a, b in self.host.refresh_tag_view():
            digest.mark_stale(a, b)
        stale, read_before = len(digest.pending_chunks()), digest.bytes_read
        digest.refresh_parallel(frozen=True)  # the guest is paused
        keeper = self._digest_keeper
        return digest, {
            "keeper": None
            if keeper is None
            else {
                "cpu_s": round(keeper.cpu_s, 4),
                "mib_read": round(read_before / 2**20, 1),
                "scans": keeper.scans,
                "pages_written": keeper.pages_written,
            },
            "taken": taken,
            "trusts_dirty_tracking": not independent,
            "write_watch": "on" if watched else self._watch_note,
            "chunks_read_at_pause": stale,
            # counted by the digest as it reads (asking the file how much RAM
            # is populated scanned all of it with SEEK_HOLE, in the downtime)
            "mib_read_at_pause": round((digest.bytes_read - read_before) / 2**20, 1),
            "final_ms": _ms(time.perf_counter() - asked_at),
        }

    def _watched_digest_at_pause(self) -> tuple[MemoryDigest | None, str]:
        """The digest the keeper kept from the write watch, with the pages
        written since its last look marked stale, and the tags stored since
        and those whose PG_mte_tagged changed (without a watch over the tag
        storage, every chunk's tags); (None, "") without a watch, or when it
        failed (then RAM is re-read whole)."""
        if self._watch is None:
            return None, ""
        try:
            written = self._watch.written()
            tags_written = self._tag_watch.written() if self._tag_watch is not None else None
        except OSError as exc:
            self._watch_note = f"the write watch failed at the pause: {one_line(exc)}"
            return None, ""
        digest = self._watched
        for a, b in written:
            digest.mark_stale(a, b)
        if tags_written is None:
            digest.mark_all_tags_stale()
        else:
            for a, b in tags_written:
                digest.mark_tags_stale(a, b)
            digest.mark_tags_stale_where_flags_changed()
        return digest, "kept up to date by the host's write watch"

    async def _final_digest(self, reading) -> MemoryDigest:
        digest, self.result["digest"] = await reading
        self._digest = digest
        return digest

    # -- completion -----------------------------------------------------------------
    async def _complete(self) -> None:
        """COMPLETE with this side's digests; the destination's CONFIRM carries
        its own; they must agree (or the differing chunks are inspected)."""
        state = self._state
        sdigest = state_digest(state)  # once, while the memory digest is still being taken
        digest = await self._digest_job
        final_pass = self._dirty_passes + 1
        await self._chan.send(fr.Complete(digest.data_digest(), digest.tag_digest(), sdigest, final_pass=final_pass))
        confirm = await self._peer.answer(self._chan, self._confirm_timeout())
        # Everything has crossed and been digested on both sides: the
        # transfer time every strategy is compared on (validation
        # details and switchover come after).
        self.result["confirm_time_ms"] = _ms(time.perf_counter() - self._clock.start)
        if confirm.type != fr.FrameType.CONFIRM:
            raise ProtocolError(f"expected CONFIRM, got {confirm.type.name}")
        validation = await self._validate(self._chan, digest, confirm, state, sdigest)
        self.result["validation"] = validation.to_dict()
        if not validation.ok:
            raise ValidationFailed(validation.summary())

    def _confirm_timeout(self) -> float:
        # The destination digests the chunks of the final pass before it
        # answers; allow for that at a pessimistic 250 MB/s, no more.
        final_pages = self.passes[-1]["pages"] if self.passes else 0
        stale_pages = min(final_pages * PIECE_PAGES, self.host.memory.npages)  # a page stales a digest piece
        return self.config.timeout_s + stale_pages * PAGE_SIZE / 250e6

    async def _validate(self, chan, digest, confirm, state, sdigest: str) -> Validation:
        cfg, memory = self.config, self.host.memory
        validation = Validation(cfg.validate, pages_checked=memory.npages, compared=self._what_is_compared(state))
        validation.state_ok = confirm.state_digest == sdigest
        nchunks = chunk_count(memory.npages)
        try:
            their_data, their_tags = MemoryDigest.split_chunk_crcs(confirm.chunk_crcs, nchunks)
        except ValueError as exc:
            raise ProtocolError(f"CONFIRM: {exc}") from None
        if cfg.validate == "full":
            chunks = list(range(nchunks))
        elif confirm.data_digest == digest.data_digest() and confirm.tag_digest == digest.tag_digest():
            chunks = []
        else:
            chunks = differing_chunks(digest.data_crcs, digest.tag_crcs, their_data, their_tags)
        loop = asyncio.get_running_loop()
        for i in range(0, len(chunks), fr.Inspect.MAX_CHUNKS):
            group = chunks[i : i + fr.Inspect.MAX_CHUNKS]
            await chan.send(fr.Inspect(group))
            reply = await chan.recv()
            if reply.type != fr.FrameType.INSPECTION or reply.chunks != group:
                raise ProtocolError("INSPECTION does not answer the INSPECT request")
            mine = await loop.run_in_executor(None, page_detail, memory, group)
            try:
                compare_detail(validation, group, mine, reply.detail, memory.npages)
            except ValueError as exc:
                raise ProtocolError(f"INSPECTION: {exc}") from None
        return validation

    def _what_is_compared(self, state) -> str:
        memory = {
            "digest": "per-chunk CRCs of the source's RAM and tags as they were at the pause (trusting no "
            "dirty tracking: kept from the host's write watch, or read again after the pause), against the "
            "destination's record of what it wrote",
            "reread": "per-chunk CRCs of the source's RAM and tags, all read again after the pause (trusting no "
            "dirty tracking), against the destination's record of what it wrote",
            "tracked": "per-chunk CRCs of the source's RAM and tags kept from the dirty-log harvests (TRUSTS "
            "the dirty tracking), against the destination's record of what it wrote",
            "full": "every page and every tag of both sides",
        }[self.config.validate]
        devices = ", ".join(state["devices"]) or "none (the guest has no emulated device)"
        return f"{memory}; vCPU registers as loaded into the destination's vCPUs; device state: {devices}"

    # -- hand over ------------------------------------------------------------------
    async def _hand_over(self) -> None:
        """GO, and the destination's RESUMED: the guest runs there now."""
        # From here on the destination owns the guest: whatever happens
        # next, this side never resumes it.
        self.handed_over = True
        try:
            await self._chan.send(fr.Go())
            resumed = await self._chan.recv()
            if resumed.type != fr.FrameType.RESUMED:
                raise ProtocolError(f"expected RESUMED, got {resumed.type.name}")
        except MigrationError as lost:
            # The one window where neither side can be sure: tell the
            # destination again, on a new connection, that it owns the guest.
            if not await self._settle_lost_go(self._address, lost):
                self.handed_over = False  # _finish resumes the guest here
                raise DestinationGone(
                    f"GO was lost and the destination is gone ({one_line(lost)}); the guest resumed on the source"
                ) from None
            self.result["recovered"] = True
        clock, resumed_at = self._clock, time.perf_counter()
        clock.done = resumed_at
        self.result["downtime_ms"] = _ms(resumed_at - clock.pause)
        self.result["downtime_breakdown_ms"] = {
            "final_memory": _ms(clock.memory_sent - clock.pause),
            "state": _ms(clock.state_sent - clock.memory_sent),
            "completion": _ms(resumed_at - clock.state_sent),
        }
        self.result["status"] = "completed"
        self.result["guest_on"] = "destination"

    async def _settle_lost_go(self, address, lost: MigrationError) -> bool:
        """True once the destination confirms it runs the guest, False when it
        is to resume here (see SourceRecovery.settle_lost_go)."""
        return await self._recovery.settle_lost_go(address, lost)

    # -- the end, whatever happened -------------------------------------------------
    def _fail(self, exc: MigrationError) -> None:
        res = self.result
        res["status"] = exc.status
        res["error"] = one_line(exc)
        self._error = exc
        if self._switched and not isinstance(exc, ValidationFailed):
            # After the postcopy switch neither side holds the whole guest:
            # keep this paused copy, discard nothing.
            res["status"] = "postcopy-paused"
            res["guest_on"] = (
                "split: the guest ran on the destination from the postcopy switch; the pages it lacked are "
                "only in this paused copy, held until this process ended"
            )
        self.progress.message(f"migration {res['status']}: {res['error']}")

    async def _finish(self) -> None:
        """Tell the destination what failed, stop every thread and log, and
        resume the guest here unless it was handed over."""
        if self._error is not None:
            await self._report_failure(self._error)
        if self._digest_keeper is not None:
            await self._digest_keeper.stop()  # before the guest's memory can go away
        self._peer.stop()
        if self._chan is not None:
            self._chan.close()
        if self._fault_chan is not None:
            self._fault_chan.close()
        self._sender.close()
        self._dirty_log.stop()
        if self.strategy is not None:
            self.strategy.close()
        if self._converge is not None:
            self.result["throttle"] = {"max": max(self._converge.history, default=0.0), "steps": self._converge.history}
        self.host.vcpus.set_throttle(0.0)  # the guest runs at full speed again, wherever it is
        if not self.handed_over:
            if self._paused_here:
                self.host.vcpus.resume()  # nothing lost: the guest goes on here
            self.result["guest_on"] = "source"
        elif self.result["status"] not in ("completed", "postcopy-paused") and not self.result["guest_on"].startswith(
            "destination"
        ):
            self.result["guest_on"] = "unknown: GO was sent but the destination did not confirm resuming"
        if self._digest_reading is not None and not self._digest_reading.done():
            # A failure during the final pass: the re-read may still be
            # running; it only reads, but must end before the memory can go.
            await asyncio.get_running_loop().run_in_executor(None, wait_for_threads, [self._digest_reading])
        self._close_write_watch()

    async def _report_failure(self, err: MigrationError) -> None:
        machine = self.machine
        if (
            self._chan is not None
            and machine is not None
            and not machine.finished
            and not isinstance(err, (PeerError, TransportError))
        ):
            frame = fr.Abort(one_line(err)) if isinstance(err, Cancelled) else fr.Error(err.code, one_line(err))
            try:
                async with asyncio.timeout(1.0):
                    # unpaced: a few bytes must not wait behind --max-bandwidth's
                    # booking of the pages sent before (a 4 MiB frame at 2 MiB/s: 2 s)
                    await self._chan.send(frame, paced=False)
            except Exception:  # best effort: the peer may be gone
                pass
        if (
            not self.handed_over
            and machine is not None
            and machine.state in (SourceState.VALIDATING,)
            and isinstance(err, TransportError)
        ):
            # The destination confirmed and now waits for GO it will never
            # get: tell it, on a new connection, that this side keeps the guest.
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await self._recovery.send(self._address, "abort", err)
            except (MigrationError, TimeoutError):
                pass
        if machine is not None:
            machine.fail(one_line(err))

    def _fill_stats(self, counters_before) -> None:
        res, host, lanes = self.result, self.host, self.lanes
        chan = lanes[0].chan if lanes else self._chan  # the control connection (postcopy's recovery ones below)
        extra = self._recovered_chans + self._fault_chans
        # A completed migration ends when the guest runs on the destination;
        # closing threads, connections and the write watch after that is
        # the teardown (QEMU's total-time, too, ends before its clean-up).
        now = time.perf_counter()
        end = self._clock.done or now
        res["total_time_ms"] = _ms(end - self._clock.start)
        res["teardown_ms"] = _ms(now - end) if self._clock.done else None
        res["counters"] = type(host.counters).delta(host.counters.snapshot(), counters_before)
        res["guest_pages_touched"] = (
            host.vcpus.pages_touched - self._touched_before if self._touched_before is not None else None
        )
        s = self._sender.totals()
        total_s = res["total_time_ms"] / 1000.0
        sent = sum(lane.chan.bytes_sent for lane in lanes) if lanes else (chan.bytes_sent if chan else 0)
        sent += sum(c.bytes_sent for c in extra)
        res["passes"] = self.passes
        res["ram"].update(
            transferred_bytes=sent,
            zero_pages=s.zero_pages,
            unscanned_pages=s.unscanned_pages,
            torn_pages=self._torn_pages,
            normal_pages=s.normal_pages,
            normal_bytes=s.data_bytes,
            remaining_bytes=0 if res["status"] == "completed" else None,
            mbps=round(sent * 8 / total_s / 1e6, 3) if total_s else 0.0,
            guest_bytes_per_s=round(res["ram"]["total_bytes"] / total_s)
            if total_s and res["status"] == "completed"
            else None,
            dirty_pages_rate=round(self._dirty_log.rate(self.passes) or 0.0, 1),
        )
        res["tags"].update(tagged_pages=s.tagged_pages, raw_bytes=s.tag_raw, wire_bytes=s.tag_wire)
        comps = [lane.builder.compressor for lane in lanes]
        res["wire"].update(
            bytes_sent=sent,
            bytes_received=(chan.bytes_received if chan else 0) + sum(c.bytes_received for c in extra),
            protection=protection(self._tls, self.config.psk_file),
            authenticated_frames=(
                sum(lane.chan.conn.authenticated_frames for lane in lanes)
                if lanes
                else (chan.conn.authenticated_frames if chan else 0)
            )
            + sum(c.conn.authenticated_frames for c in extra),
            data_bytes=s.data_wire,
            tag_bytes=s.tag_wire,
            channels=len(lanes) or None,
            page_channels=self._sender.page_lanes or None,
            compression=None
            if not comps
            else {
                "mode": comps[0].mode,
                "batches_compressed": sum(c.batches_compressed for c in comps),
                "batches_raw": sum(c.batches_raw for c in comps),
            },
        )
