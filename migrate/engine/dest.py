"""The destination VMM's migration engine.  It treats the stream as hostile,
applies pages in place, and resumes the guest only after the source has seen
a matching digest and said GO.  On any failure it discards what it received
and never resumes a partial guest."""

import asyncio
import logging
import socket
import time

from hosts.vcpu import VcpuState
from hosts.workloads import make_workload
from migrate.engine.digest import MemoryDigest, chunk_count, page_detail, state_digest
from migrate.engine.handshake import authenticate, hello_mismatch
from migrate.engine.pages import BatchApplier, BatchStats
from migrate.engine.progress import Progress
from migrate.engine.recovery import DestRecovery
from migrate.engine.report import empty_result
from migrate.errors import (
    AuthError,
    Cancelled,
    HandshakeMismatch,
    MigrationError,
    PeerError,
    PeerTimeout,
    ProtocolError,
    TransportError,
    one_line,
)
from migrate.net import tls
from migrate.net.threads import LoopThread
from migrate.net.transport import FrameChannel, secure, tune
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.protocol.machine import Connection, DestState, data_dest_machine, dest_machine
from migrate.strategies import STRATEGIES

log = logging.getLogger("migrate.engine.dest")
T = fr.FrameType


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
        self.machine = None
        self.resumed = False
        self.hello = None
        self._lanes: dict[int, dict] = {}  # channel -> {thread, chan, stats, pass}
        self._early_digest = None  # (final pass, task) once STATE arrived
        self._frozen = False  # the final digest has started: no PAGES any more
        self._refresher: asyncio.Task | None = None  # background digest refreshes while pages land
        self._lane_failure: asyncio.Future | None = None
        self._lane_progress: asyncio.Event | None = None
        self._pass_seen = {0: -1}  # channel -> last PASS_END
        self._key = auth.load_key(config.psk_file)
        self._nonce = b""
        self._recovery = DestRecovery(config, self._key, self.result, self._resume)
        self._handshaking = False
        self._ready = asyncio.Event()
        self._tls = tls.from_options(config.tls_cert, config.tls_key, config.tls_ca)

    async def serve(self, listener: socket.socket) -> dict:
        """Accept one migration on ``listener``; refuse any other connection."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, peer = await loop.sock_accept(listener)
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

    async def _accept_more(self, listener) -> None:
        """Later connections: data channels of this migration (JOIN with its
        session), or anyone else, who is told the destination is busy."""
        loop = asyncio.get_running_loop()
        pending: set = set()
        while True:
            sock, _ = await loop.sock_accept(listener)
            if len(pending) >= self.MAX_PENDING:
                sock.close()  # memory stays bounded: at most MAX_PENDING receive buffers for strangers
                continue
            tune(sock)
            task = asyncio.ensure_future(self._admit(sock))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _admit(self, sock) -> None:
        conn = Connection(data_dest_machine(), self.config.checksum)
        try:
            io = await secure(sock, self._tls, True, min(self.config.timeout_s, 5.0))
        except MigrationError:
            sock.close()
            return
        chan = FrameChannel(sock, conn, min(self.config.timeout_s, 5.0), io=io)
        try:
            hello = self.hello
            if hello is not None and len(self._lanes) >= hello.channels - 1 and not self._recovery.listening:
                # Every data channel is here: whoever this is, we are busy.
                raise ProtocolError("this destination is already receiving a migration")
            frame = await chan.recv()
            if frame.type == T.JOIN and self.hello is None and self._handshaking:
                # The source opens data channels right after AUTH, which we
                # may not have read yet: wait for the handshake to finish.
                async with asyncio.timeout(self.config.timeout_s):
                    await self._ready.wait()
            hello = self.hello
            if frame.type == T.RECOVER:
                await self._recovery.take(frame, chan, self.hello, self.resumed)
                return
            if frame.type == T.HELLO:
                raise ProtocolError("this destination is already receiving a migration")
            if hello is None or self.machine is None or self.machine.finished:
                raise (
                    ProtocolError("this destination is already receiving a migration")
                    if hello
                    else ProtocolError("no migration to join")
                )
            if frame.session != hello.session or not 1 <= frame.channel < hello.channels:
                raise ProtocolError(f"JOIN for channel {frame.channel} of an unknown session")
            if frame.channel in self._lanes:
                raise ProtocolError(f"data channel {frame.channel} joined twice")
            if self._key is not None and not auth.check(
                self._key, frame.proof, "join", frame.session, frame.channel, self._nonce
            ):
                raise AuthError(f"data channel {frame.channel} failed authentication")
            if chan._end > chan._start:
                raise ProtocolError("data arrived on a channel before its WELCOME")
            conn.ram_pages = self.host.memory.npages
            await chan.send(fr.Welcome(PROTOCOL_VERSION))
        except MigrationError as exc:
            code = "busy" if "already receiving" in str(exc) else exc.code
            try:
                async with asyncio.timeout(1.0):
                    for b in fr.encode(fr.Error(code, one_line(exc))):
                        await io.sendall(b)
            except (OSError, TimeoutError):
                pass
            chan.close()
            return
        # Hand the connection to a thread of its own (no bytes are buffered:
        # the source sends nothing before WELCOME).
        thread = LoopThread(f"channel{frame.channel}")
        lane = {"thread": thread, "stats": BatchStats(), "bytes": 0}
        self._lanes[frame.channel] = lane
        self._pass_seen[frame.channel] = -1
        thread.submit(self._receive_lane(frame.channel, sock, conn, lane, asyncio.get_running_loop(), io))

    async def _receive_lane(self, index: int, sock, conn, lane: dict, main_loop, io) -> None:
        """Runs on the channel's thread: apply PAGES, report PASS_END."""
        io.loop = asyncio.get_running_loop()  # the connection moves to this thread's loop
        chan = FrameChannel(sock, conn, self.config.timeout_s, io=io)
        lane["chan"] = chan
        strategy = self.strategy
        applier = BatchApplier(
            strategy,
            self.host.memory.npages,
            self._applier.written,
            self._applier.has_tags,
            on_write=self._digest.mark_stale,
            digest=self._digest,
        )
        ended = -1  # the last pass this channel ended
        # Whole chunks of raw data are spliced into place (never a frame the
        # checks below would refuse).
        chan.placer = lambda fields, dl: (
            None if fields["pass_no"] <= ended or self._frozen else applier.placement(fields, dl)
        )
        try:
            while True:
                frame = await chan.recv(timeout=None)  # liveness is watched by the control loop
                if frame.type == T.PAGES:
                    if frame.pass_no <= ended or self._frozen:
                        raise ProtocolError(
                            f"PAGES of pass {frame.pass_no} on data channel {index} after "
                            + ("that pass ended" if frame.pass_no <= ended else "the final pass")
                        )
                    lane["stats"].add(applier.apply(frame))
                elif frame.type == T.PASS_END:
                    ended = max(ended, frame.pass_no)
                    main_loop.call_soon_threadsafe(self._lane_pass_end, index, frame.pass_no)
                elif frame.type == T.ERROR:
                    raise PeerError(f"source: {frame.message}", frame.code)
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} frame on data channel {index}")
        except TransportError as exc:
            if not chan.closed and not (self.machine and self.machine.finished):
                main_loop.call_soon_threadsafe(self._lane_failed, index, exc)
        except MigrationError as exc:
            main_loop.call_soon_threadsafe(self._lane_failed, index, exc)
        except Exception as exc:  # a bug: fail the migration, never hang
            main_loop.call_soon_threadsafe(
                self._lane_failed,
                index,
                MigrationError(f"internal error on data channel {index}: {type(exc).__name__}: {one_line(exc)}"),
            )
        finally:
            lane["bytes"] = chan.bytes_received
            chan.close()

    def _lane_pass_end(self, index: int, pass_no: int) -> None:
        self._pass_seen[index] = pass_no
        self._lane_progress.set()

    def _lane_failed(self, index: int, exc: MigrationError) -> None:
        if self._lane_failure is not None and not self._lane_failure.done():
            self._lane_failure.set_exception(exc)

    async def _recv_control(self, chan):
        """The next control frame; fails as soon as a data channel fails, and
        times out once no channel at all has received for --timeout (checked
        a few times per timeout, so detection takes at most ~1.25 timeouts)."""
        recv = asyncio.ensure_future(chan.recv(timeout=None))
        try:
            while True:
                done, _ = await asyncio.wait(
                    {recv, self._lane_failure}, timeout=self.config.timeout_s / 4, return_when=asyncio.FIRST_COMPLETED
                )
                if recv in done:
                    return recv.result()
                if self._lane_failure in done:
                    raise self._lane_failure.exception()
                if not self._channels_active():
                    raise PeerTimeout(f"source sent nothing for {self.config.timeout_s:g} s")
        finally:
            if not recv.done():
                recv.cancel()
                try:
                    await recv
                except (asyncio.CancelledError, MigrationError):
                    pass

    def _channels_active(self) -> bool:
        now = time.monotonic()
        chans = [self.chan] + [lane["chan"] for lane in self._lanes.values() if "chan" in lane]
        return any(now - c.last_activity < self.config.timeout_s for c in chans)

    async def _await_final_pass(self, final_pass: int) -> None:
        """Every data channel must have delivered the final pass."""
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            missing = [c for c in range(1, self.hello.channels) if self._pass_seen.get(c, -1) < final_pass]
            if not missing:
                return
            if self._lane_failure.done():
                raise self._lane_failure.exception()
            if time.monotonic() > deadline and not self._channels_active():
                raise PeerTimeout(f"data channel {missing[0]} did not deliver the final pass")
            self._lane_progress.clear()
            try:
                await asyncio.wait_for(self._lane_progress.wait(), 0.5)
            except TimeoutError:
                pass

    async def receive(self, sock: socket.socket, io=None) -> dict:
        host, cfg, res = self.host, self.config, self.result
        res["ram"]["total_bytes"] = host.memory.size
        t_start = time.perf_counter()
        before = host.counters.snapshot()
        conn = Connection(dest_machine(), cfg.checksum)
        self.machine = conn.machine
        chan = self.chan = FrameChannel(sock, conn, cfg.timeout_s, io=io)
        try:
            hello = await chan.recv()
            mismatch = hello_mismatch(hello, host, self.required_strategy, self.expect_uuid)
            if mismatch:
                await chan.send(fr.Error("mismatch", mismatch))
                raise HandshakeMismatch(mismatch)
            res["strategy"] = hello.strategy
            self.strategy = STRATEGIES[hello.strategy](host, cfg)
            self.strategy.setup_dest()
            # Digest incrementally: chunks are marked stale as pages land and
            # re-read in the background after each pass, so completion only
            # reads what the last pass wrote.
            self._digest = MemoryDigest(host.memory, compute=False)
            self._refresh_job = None
            self._early_digest = None  # (final pass, task) once STATE arrived
            self._frozen = False  # the final digest has started: no PAGES any more
            applier = self._applier = BatchApplier(
                self.strategy, host.memory.npages, on_write=self._digest.mark_stale, digest=self._digest
            )
            self._lane_failure = asyncio.get_running_loop().create_future()
            # Read by _recv_control when it matters; never "unretrieved".
            self._lane_failure.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._lane_progress = asyncio.Event()
            self._handshaking = True
            self._nonce = auth.new_nonce()
            await authenticate(chan, hello, self._key, self._nonce)
            self.hello = hello
            # Authenticated: whole chunks of raw data are spliced into place
            # from here on (never a frame the checks below would refuse).
            chan.placer = lambda fields, dl: (
                None if fields["pass_no"] <= self._pass_seen[0] else applier.placement(fields, dl)
            )
            self._ready.set()
            self._refresher = asyncio.ensure_future(self._refresh_loop())
            res["setup_time_ms"] = _ms(time.perf_counter() - t_start)
            state = None
            while True:
                frame = await self._recv_control(chan)
                ftype = frame.type
                if ftype == T.PAGES:
                    if frame.pass_no <= self._pass_seen[0]:
                        raise ProtocolError(f"PAGES of pass {frame.pass_no} after that pass ended")
                    self.stats.add(applier.apply(frame))
                elif ftype == T.PASS_END:
                    res["dirty_sync_count"] = frame.pass_no
                    self._pass_seen[0] = frame.pass_no
                    self._start_refresh()
                elif ftype == T.STATE:
                    state = frame.state
                    self._load_state(state)
                    self._start_final_digest(self._pass_seen[0])
                elif ftype == T.COMPLETE:
                    await self._await_final_pass(frame.final_pass)
                    await self._confirm(chan, state, frame.final_pass)
                elif ftype == T.INSPECT:
                    self._check_chunks(frame.chunks)
                    detail = await asyncio.get_running_loop().run_in_executor(
                        None, page_detail, host.memory, frame.chunks
                    )
                    await chan.send(fr.Inspection(frame.chunks, detail))
                elif ftype == T.GO:
                    self._resume()
                    res["status"] = "completed"
                    try:
                        await chan.send(fr.Resumed())
                    except MigrationError:
                        pass  # the source will ask again (RECOVER go): we linger for it
                    await self._recovery.linger(chan)
                    break
                elif ftype == T.ERROR:
                    raise PeerError(f"source: {frame.message}", frame.code)
                elif ftype == T.ABORT:
                    raise Cancelled(f"source aborted: {frame.reason}")
        except asyncio.CancelledError:
            self._fail(Cancelled("cancelled by the user"), chan)
        except MigrationError as exc:
            # After CONFIRM, a broken or garbled stream may have carried GO:
            # only the source's own ERROR or ABORT says it kept the guest.
            if self.machine.state == DestState.AWAIT_GO and not isinstance(exc, (PeerError, Cancelled)):
                try:
                    if await self._recovery.wait(exc, self.hello.session):
                        res["status"], res["error"] = "completed", None
                except MigrationError as final:
                    self._fail(final, chan)
            else:
                self._fail(exc, chan)
        except Exception as exc:
            log.exception("internal error")
            self._fail(MigrationError(f"internal error: {type(exc).__name__}: {one_line(exc)}"), chan)
        finally:
            if self._refresher is not None:
                self._refresher.cancel()
            if self._early_digest is not None:
                self._early_digest[1].cancel()
            if not self.resumed:
                await self._report_failure(chan)
            chan.close()
            for lane in self._lanes.values():
                if "chan" in lane:
                    lane["chan"].close()
                lane["thread"].stop()
                self.stats.add(lane["stats"])
            if getattr(self, "strategy", None) is not None:
                self.strategy.close()
            res["total_time_ms"] = _ms(time.perf_counter() - t_start)
            res["counters"] = type(host.counters).delta(host.counters.snapshot(), before)
            s = self.stats
            received = chan.bytes_received + sum(lane["bytes"] for lane in self._lanes.values())
            res["ram"].update(
                transferred_bytes=received,
                zero_pages=s.zero_pages,
                normal_pages=s.normal_pages,
                normal_bytes=s.data_bytes,
                spliced_bytes=s.spliced_bytes,
            )
            res["tags"].update(tagged_pages=s.tagged_pages, raw_bytes=s.tag_raw, wire_bytes=s.tag_wire)
            res["wire"].update(
                bytes_sent=chan.bytes_sent,
                bytes_received=received,
                channels=1 + len(self._lanes),
                data_bytes=s.data_wire,
                tag_bytes=s.tag_wire,
            )
        return res

    # -- handshake ----------------------------------------------------------------
    # -- state and completion --------------------------------------------------------
    def _load_state(self, state: dict) -> None:
        """Check and stage vCPU + workload state; nothing runs until GO."""
        try:
            vcpus = [VcpuState.from_wire(v) for v in state["vcpus"]]
            wl = state["workload"]
            workload = make_workload(
                wl["name"],
                self.host.vm,
                seed=int(wl["seed"]),
                vcpus=len(vcpus),
                params=dict(wl["params"]),
                device=self.host.device_mapping,
            )
            workload.set_state(wl["state"])
            self.host.vcpus.set_states(vcpus)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ProtocolError(f"STATE is not a valid guest state: {type(exc).__name__}: {one_line(exc)}") from None
        self._staged_workload = workload

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
                None, lambda: digest.refresh(digest.pending_chunks(unread=False))
            )

    def _start_final_digest(self, final_pass: int) -> None:
        """The source sends its state right after the final pass, then digests
        its own memory before COMPLETE.  Once every channel has delivered that
        pass nothing writes this RAM again, so digest it now, alongside the
        source, instead of after its COMPLETE (the downtime waits for both)."""

        async def run():
            await self._await_final_pass(final_pass)
            self._frozen = True  # a PAGES frame from now on is refused
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
            await self._refresh_job
        stale, stale_bytes = len(self._digest.pending_chunks()), self._digest.stale_piece_bytes()
        await self._digest.refresh_parallel(
            asyncio.get_running_loop(), frozen=True
        )  # every channel delivered the final pass
        self.result["final_digest"] = {
            "stale_chunks": stale,
            "stale_mib": round(stale_bytes / 2**20, 1),
            "ms": _ms(time.perf_counter() - t),
        }

    async def _confirm(self, chan, state, final_pass: int) -> None:
        early = self._early_digest
        if early is not None and early[0] == final_pass:
            await early[1]
        else:  # COMPLETE names another pass than the one before STATE: digest now
            if early is not None:
                early[1].cancel()
            self._frozen = True
            await self._final_digest()
        if self._lane_failure.done():  # a data channel failed after delivering the final pass
            raise self._lane_failure.exception()
        digest = self._digest
        sdigest = state_digest(state) if state is not None else ""
        await chan.send(fr.Confirm(digest.data_digest(), digest.tag_digest(), sdigest, digest.chunk_crcs()))

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

    # -- failure -------------------------------------------------------------------
    def _fail(self, exc: MigrationError, chan) -> None:
        self.result["status"] = exc.status
        self.result["error"] = one_line(exc)
        self._error = exc
        self.progress.message(f"migration {exc.status}: {self.result['error']}")

    async def _report_failure(self, chan) -> None:
        """Tell the source why (unless it told us), then discard what arrived."""
        err = getattr(self, "_error", None)
        if (
            err is not None
            and not isinstance(err, (PeerError, Cancelled))
            and not chan.closed
            and self.machine is not None
            and not self.machine.finished
            and not isinstance(err, HandshakeMismatch)
        ):
            try:
                async with asyncio.timeout(1.0):
                    await chan.send(fr.Error(err.code, one_line(err)))
            except Exception:
                pass
        if self.machine is not None:
            self.machine.fail("discarding the partial guest")
        self.result["guest_on"] = "nowhere (partial state discarded)"
