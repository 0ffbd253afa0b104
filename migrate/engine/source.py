"""The source VMM's migration engine: handshake, bulk pass, dirty passes to
convergence, stop-and-copy, completion -- and, whatever goes wrong, the guest
resumes here with memory and tags untouched."""

import asyncio
import logging
import secrets
import time

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from migrate.engine.bitmaps import runs
from migrate.engine.convergence import AutoConverge, DowntimeOrPassLimit
from migrate.engine.digest import PIECE_PAGES, MemoryDigest, chunk_count, page_detail, state_digest
from migrate.engine.digest_keeper import DigestKeeper
from migrate.engine.handshake import introduce
from migrate.engine.lanes import SendLane, partition
from migrate.engine.pages import BatchBuilder, BatchStats
from migrate.engine.progress import Progress
from migrate.engine.recovery import SourceRecovery
from migrate.engine.report import empty_result
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
from migrate.net.transport import FrameChannel, connect, secure
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.compression import Compressor
from migrate.protocol.machine import (
    Connection,
    SourceState,
    data_source_machine,
    source_machine,
)
from migrate.strategies import get as get_strategy

log = logging.getLogger("migrate.engine.source")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _union(a: bytes, b: bytes) -> bytes:
    """Bytewise OR of two 0/1 page maps, in bulk (big-int OR, not per page)."""
    if b.find(1) < 0:
        return a
    if a.find(1) < 0:
        return b
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


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


class SourceVmm:
    def __init__(self, host, config, scenario: str = "custom", progress: Progress | None = None):
        self.host = host
        self.config = config
        self.scenario = scenario
        self.progress = progress or Progress(False)
        self.machine = None
        self.result = empty_result(scenario, config.strategy)
        self.passes: list[dict] = []
        self._peer_task = None
        self._chan = None
        self.lanes: list[SendLane] = []
        self._threads: list[LoopThread] = []
        self._recovery: SourceRecovery | None = None  # once the session is known

    # -- public ---------------------------------------------------------------------
    async def migrate(self, address: tuple[str, int]) -> dict:
        """Migrate the guest to the destination at ``address``; returns the result."""
        host, cfg, res = self.host, self.config, self.result
        res["ram"]["total_bytes"] = host.memory.size
        t_start = time.perf_counter()
        before = host.counters.snapshot()
        self.handed_over = False
        paused_here = False
        self._address = address
        try:
            auth.load_key(cfg.psk_file)  # a missing or short key fails here, before any connection
            sock = await connect(*address, cfg.timeout_s)
            conn = Connection(source_machine(), cfg.checksum)
            self.machine = conn.machine
            limiter = RateLimiter(cfg.max_bandwidth) if cfg.max_bandwidth else None
            self._tls = tls.from_options(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
            io = await secure(sock, self._tls, False, cfg.timeout_s)
            chan = self._chan = FrameChannel(sock, conn, cfg.timeout_s, limiter, io)
            strategy = get_strategy(cfg.strategy)(host, cfg)
            self.strategy = strategy
            session = self._session = secrets.token_hex(8)
            self._recovery = SourceRecovery(cfg, self._tls, session, res, self.progress)
            self._dest_nonce = await introduce(chan, host, cfg, strategy, session, self._tls)
            compressor = Compressor(cfg.compression, cfg.max_bandwidth)
            self.lanes = [SendLane(0, chan, self._new_builder(compressor), cfg.batch_pages)]
            for i in range(1, cfg.channels):
                thread = LoopThread(f"channel{i}")
                self._threads.append(thread)
                self.lanes.append(await thread.submit(self._open_lane(i, address, session, limiter)))
            res["setup_time_ms"] = _ms(time.perf_counter() - t_start)

            # Dirty logging starts before the first page is read: the rule
            # "clear / write-protect first, then copy" from pass 0 on.
            for slot in host.vm.memslots:
                host.vm.enable_dirty_logging(slot.slot)
            host.vmm_dirty.enabled = True
            strategy.setup_source()
            self._peer_task = asyncio.ensure_future(chan.recv(timeout=None))
            # The validation digest is kept up to date from here on, in the
            # background: every write after a chunk is read is in a later
            # dirty harvest, which marks the chunk stale (see _harvest), so
            # after the pause only the chunks dirtied since are read again.
            self._digest = MemoryDigest(host.memory, compute=False)
            for lane in self.lanes:
                lane.builder.digest = self._digest
            # With checked frames the bulk pass digests the chunks it sends
            # (BatchBuilder), and the background loop starts after it.
            self._digest_loop = None if self.lanes[0].builder.checked else DigestKeeper(self._digest)

            policy = DowntimeOrPassLimit(cfg.downtime_limit_ms, cfg.max_passes)
            converge = (
                AutoConverge(cfg.throttle_initial, cfg.throttle_increment, cfg.throttle_max)
                if cfg.auto_converge
                else None
            )
            self._converge = converge
            await self._send_pass(0, host.memory.populated_ranges())
            if self._digest_loop is None:
                self._digest_loop = DigestKeeper(self._digest)
            dirty_passes = 0
            tags_only = b""
            while True:
                bitmap = self._harvest()
                tags_only = _union(tags_only, self._harvest_tags_only(bitmap))
                remaining = bitmap.count(1) * PAGE_SIZE + tags_only.count(1) * PACKED_TAGS_PER_PAGE
                bandwidth = dirty_pass_bandwidth(self.passes)
                decision = policy.decide(dirty_passes, remaining, bandwidth)
                res["expected_downtime_ms"] = policy.expected_downtime_ms(remaining, bandwidth)
                if decision.stop:
                    break
                if converge is not None and dirty_passes >= 1:
                    throttle = converge.after_pass(remaining)
                    if throttle != host.vcpus.throttle:
                        host.vcpus.set_throttle(throttle)
                        self.progress.message(f"auto-converge: vCPUs throttled to {throttle:.0%}")
                dirty_passes += 1
                await self._send_pass(dirty_passes, list(runs(bitmap, 1)), tags_only=tags_only)
                tags_only = b""
            res["convergence"] = {"policy": policy.name, "reason": decision.reason, "forced": decision.forced}
            self.progress.message(f"stop-and-copy: {decision.reason}")

            # -- stop and copy --------------------------------------------------------
            t_pause = time.perf_counter()
            host.vcpus.pause()
            paused_here = True
            conn.machine.local("pause")
            # The pages harvested for the last decision were never sent:
            # they go out with whatever the guest dirtied since.
            final = _union(bitmap, self._harvest())
            tags_only = _union(tags_only, self._harvest_tags_only(final))
            # Memory is frozen and the last harvest marked what changed: bring
            # the digest up to date in threads (CRC releases the GIL) while
            # the last pages go out.
            digest_job = asyncio.ensure_future(self._final_digest())
            await self._send_pass(dirty_passes + 1, list(runs(final, 1)), final=True, tags_only=tags_only)
            t_mem = time.perf_counter()
            state = self._collect_state()
            await chan.send(fr.State(state))
            t_state = time.perf_counter()
            digest = await digest_job
            await chan.send(
                fr.Complete(digest.data_digest(), digest.tag_digest(), state_digest(state), final_pass=dirty_passes + 1)
            )
            confirm = await self._await_peer(chan)
            # Everything has crossed and been digested on both sides: the
            # transfer time every strategy is compared on (validation
            # details and switchover come after).
            res["confirm_time_ms"] = _ms(time.perf_counter() - t_start)
            if confirm.type != fr.FrameType.CONFIRM:
                raise ProtocolError(f"expected CONFIRM, got {confirm.type.name}")
            validation = await self._validate(chan, digest, confirm, state)
            res["validation"] = validation.to_dict()
            if not validation.ok:
                raise ValidationFailed(validation.summary())
            # From here on the destination owns the guest: whatever happens
            # next, this side never resumes it.
            self.handed_over = True
            try:
                await chan.send(fr.Go())
                resumed = await chan.recv()
                if resumed.type != fr.FrameType.RESUMED:
                    raise ProtocolError(f"expected RESUMED, got {resumed.type.name}")
            except MigrationError as lost:
                # The one window where neither side can be sure: tell the
                # destination again, on a new connection, that it owns the guest.
                if not await self._settle_lost_go(address, lost):
                    self.handed_over = False  # _finish resumes the guest here
                    raise DestinationGone(
                        f"GO was lost and the destination is gone ({one_line(lost)}); the guest resumed on the source"
                    ) from None
                res["recovered"] = True
            t_resumed = time.perf_counter()
            res["downtime_ms"] = _ms(t_resumed - t_pause)
            res["downtime_breakdown_ms"] = {
                "final_memory": _ms(t_mem - t_pause),
                "state": _ms(t_state - t_mem),
                "completion": _ms(t_resumed - t_state),
            }
            res["status"] = "completed"
            res["guest_on"] = "destination"
        except (asyncio.CancelledError, KeyboardInterrupt):
            self._fail(Cancelled("cancelled by the user"))
        except InDoubt as exc:
            self._fail(exc)
            res["guest_on"] = "unknown (in doubt: see the error)"
        except MigrationError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: still never lose the guest
            log.exception("internal error")
            self._fail(MigrationError(f"internal error: {type(exc).__name__}: {one_line(exc)}"))
        finally:
            await self._finish(paused_here)
            res["total_time_ms"] = _ms(time.perf_counter() - t_start)
            res["counters"] = type(host.counters).delta(host.counters.snapshot(), before)
            self._fill_stats()
        return res

    # -- steps --------------------------------------------------------------------------
    async def _open_lane(self, index: int, address, session: str, limiter) -> SendLane:
        """Runs on the channel's own thread: connect, JOIN, wait for WELCOME."""
        cfg = self.config
        sock = await connect(*address, cfg.timeout_s)
        io = await secure(sock, self._tls, False, cfg.timeout_s)
        chan = FrameChannel(sock, Connection(data_source_machine(index), cfg.checksum), cfg.timeout_s, limiter, io)
        key = auth.load_key(cfg.psk_file)
        await chan.send(
            fr.Join(session, index, auth.proof(key, "join", session, index, self._dest_nonce) if key else b"")
        )
        reply = await chan.recv()
        if reply.type == fr.FrameType.ERROR:
            chan.close()
            raise PeerError(f"destination refused data channel {index}: {reply.message}", reply.code)
        compressor = Compressor(cfg.compression, cfg.max_bandwidth)
        return SendLane(index, chan, self._new_builder(compressor), cfg.batch_pages)

    def _new_builder(self, compressor) -> BatchBuilder:
        """A channel's batch builder; with checked frames (--checksum full) it
        snapshots each batch and puts its CRCs in the frame."""
        return BatchBuilder(self.strategy, compressor, self.config.batch_pages, checked=self.config.checksum == "full")

    async def _send_pass(self, pass_no: int, ranges, final: bool = False, tags_only: bytes = b"") -> None:
        """Send the pages in ``ranges`` (data and tags) and the pages marked in
        ``tags_only`` (their tags alone), each on its chunk's channel; every
        channel ends its share with PASS_END."""
        tag_ranges = list(runs(tags_only, 1)) if tags_only else []
        total = sum(b - a for a, b in ranges) + sum(b - a for a, b in tag_ranges)
        n = len(self.lanes)
        shares, tag_shares = partition(ranges, n), partition(tag_ranges, n)
        t0 = time.perf_counter()
        start_done = [lane.pages_done for lane in self.lanes]
        jobs = [asyncio.ensure_future(self.lanes[0].send_share(pass_no, shares[0], tag_shares[0], self._check_peer))]
        for lane, thread in zip(self.lanes[1:], self._threads):
            jobs.append(
                thread.submit(
                    lane.send_share(pass_no, shares[lane.index], tag_shares[lane.index], self._check_peer_from_thread)
                )
            )
        for job in jobs:  # the first failure is raised below; the others are only read
            job.add_done_callback(lambda j: j.cancelled() or j.exception())

        def progress(force=False):
            done = sum(lane.pages_done - s0 for lane, s0 in zip(self.lanes, start_done))
            elapsed = time.perf_counter() - t0
            self.progress.update(
                pass_no,
                done,
                total,
                done * PAGE_SIZE / elapsed if elapsed else 0.0,
                self._dirty_rate(),
                self.result["expected_downtime_ms"],
                force=force,
            )

        pending = set(jobs)
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
                for job in jobs:
                    if job.done() and not job.cancelled() and job.exception() is not None:
                        self._check_peer()  # the destination's own words beat a broken pipe
                        raise job.exception()
                progress()
        finally:
            for job in pending:
                job.cancel()
        pass_stats = BatchStats()
        for job in jobs:
            pass_stats.add(job.result())
        elapsed = time.perf_counter() - t0
        self.passes.append(
            {
                "pass": pass_no,
                "final": final,
                "pages": total,
                "tags_only_pages": sum(b - a for a, b in tag_ranges),
                "normal_pages": pass_stats.normal_pages,
                "zero_pages": pass_stats.zero_pages,
                "tagged_pages": pass_stats.tagged_pages,
                "seconds": round(elapsed, 6),
                "wire_bytes": pass_stats.data_wire + pass_stats.tag_wire,
            }
        )
        progress(force=True)

    async def _settle_lost_go(self, address, lost: MigrationError) -> bool:
        """True once the destination confirms it runs the guest, False when it
        is to resume here (see SourceRecovery.settle_lost_go)."""
        return await self._recovery.settle_lost_go(address, lost)

    async def _final_digest(self) -> MemoryDigest:
        t = time.perf_counter()
        if self._digest_loop is not None:
            await self._digest_loop.stop()  # not two threads on one chunk
        stale, stale_bytes = len(self._digest.pending_chunks()), self._digest.stale_piece_bytes()
        await self._digest.refresh_parallel(asyncio.get_running_loop(), frozen=True)  # the guest is paused
        self.result["digest"] = {
            "stale_chunks_at_pause": stale,
            "stale_mib_at_pause": round(stale_bytes / 2**20, 1),
            "final_ms": _ms(time.perf_counter() - t),
        }
        return self._digest

    def _check_peer_from_thread(self) -> None:
        """From a channel thread: stop sending once the destination has spoken
        (the main loop reads what it said)."""
        task = self._peer_task
        if task is not None and task.done():
            raise TransportError("destination stopped the migration")

    def _harvest(self) -> bytes:
        """KVM_GET_DIRTY_LOG on every memslot, merged with the VMM's own
        bitmap of device writes: one byte per page, 1 = dirty."""
        vm, npages = self.host.vm, self.host.memory.npages
        merged = bytearray(npages)
        for slot in vm.memslots:
            log_ = vm.get_dirty_log(slot.slot)
            merged[slot.first_page : slot.first_page + slot.npages] = log_.bitmap
        vmm = self.host.vmm_dirty.harvest()
        merged = _union(bytes(merged), vmm)
        self._mark_digest_stale(merged)
        self.result["dirty_sync_count"] += 1
        self._last_dirty = (time.perf_counter(), merged.count(1))
        return merged

    def _harvest_tags_only(self, data_dirty: bytes) -> bytes:
        """Pages in the strategy's tags-dirty log whose data is not being
        resent anyway (with the proposed tag-dirty-log strategy only)."""
        tag_dirty = self.strategy.harvest_tag_dirty()
        if tag_dirty is None or tag_dirty.find(1) < 0:
            return b""
        self._mark_digest_stale(tag_dirty)  # tags changed there: the tag CRC is stale
        n = len(tag_dirty)
        # tag_dirty AND NOT data_dirty, in bulk: (t | d) ^ d
        t, d = int.from_bytes(tag_dirty, "little"), int.from_bytes(data_dirty, "little")
        return ((t | d) ^ d).to_bytes(n, "little")

    def _mark_digest_stale(self, bitmap: bytes) -> None:
        digest = getattr(self, "_digest", None)
        if digest is not None:
            for a, b in runs(bitmap, 1):
                digest.mark_stale(a, b)

    def _dirty_rate(self) -> float | None:
        if not self.passes or not getattr(self, "_last_dirty", None):
            return None
        last = self.passes[-1]
        return self._last_dirty[1] / last["seconds"] if last["seconds"] else None

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
            "devices": {"virtio-net0": {"rx_avail_idx": host.vcpus.steps[0] & 0xFFFF, "status": 0x0F}},
            "mte": host.vm.mte_enabled,
        }

    async def _validate(self, chan, digest, confirm, state) -> Validation:
        cfg, memory = self.config, self.host.memory
        validation = Validation(cfg.validate, pages_checked=memory.npages)
        validation.state_ok = confirm.state_digest == state_digest(state)
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

    def _check_peer(self) -> None:
        task = self._peer_task
        if task is not None and task.done():
            self._peer_task = None
            frame = task.result()  # raises the peer's transport/protocol error
            if frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
                raise PeerError(
                    f"destination: {getattr(frame, 'message', None) or frame.reason}", getattr(frame, "code", "abort")
                )
            raise ProtocolError(f"unexpected {frame.type.name} frame from the destination")

    async def _await_peer(self, chan):
        task, self._peer_task = self._peer_task, None
        if task is None:
            return await chan.recv()
        try:
            # The destination digests the chunks of the final pass before it
            # answers; allow for that at a pessimistic 250 MB/s, no more.
            final_pages = self.passes[-1]["pages"] if self.passes else 0
            stale_pages = min(final_pages * PIECE_PAGES, self.host.memory.npages)  # a page stales a digest piece
            allowance = stale_pages * PAGE_SIZE / 250e6
            frame = await asyncio.wait_for(asyncio.shield(task), self.config.timeout_s + allowance)
        except TimeoutError:
            task.cancel()
            raise TransportError("the destination did not confirm in time") from None
        if frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
            raise PeerError(
                f"destination: {getattr(frame, 'message', None) or frame.reason}", getattr(frame, "code", "abort")
            )
        return frame

    def _fail(self, exc: MigrationError) -> None:
        res = self.result
        res["status"] = exc.status
        res["error"] = one_line(exc)
        self._error = exc
        self.progress.message(f"migration {exc.status}: {res['error']}")

    async def _finish(self, paused_here: bool) -> None:
        host, chan = self.host, self._chan
        err = getattr(self, "_error", None)
        if (
            err is not None
            and chan is not None
            and self.machine is not None
            and not self.machine.finished
            and not isinstance(err, (PeerError, TransportError))
        ):
            frame = fr.Abort(one_line(err)) if isinstance(err, Cancelled) else fr.Error(err.code, one_line(err))
            try:
                async with asyncio.timeout(1.0):
                    await chan.send(frame)
            except Exception:  # best effort: the peer may be gone
                pass
        if (
            err is not None
            and not self.handed_over
            and self.machine is not None
            and self.machine.state in (SourceState.VALIDATING,)
            and isinstance(err, TransportError)
        ):
            # The destination confirmed and now waits for GO it will never
            # get: tell it, on a new connection, that this side keeps the guest.
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await self._recovery.send(self._address, "abort", err)
            except (MigrationError, TimeoutError):
                pass
        if self.machine is not None and err is not None:
            self.machine.fail(one_line(err))
        if getattr(self, "_digest_loop", None) is not None:
            await self._digest_loop.stop()  # before the guest's memory can go away
        if self._peer_task is not None:
            self._peer_task.cancel()
            self._peer_task = None
        if chan is not None:
            chan.close()
        for thread in self._threads:  # cancel what still runs there, then close its socket
            thread.stop()
        for lane in self.lanes[1:]:
            lane.chan.close()
        for slot in host.vm.memslots:
            if host.vm.dirty_logging():
                host.vm.disable_dirty_logging(slot.slot)
        host.vmm_dirty.enabled = False
        if getattr(self, "strategy", None) is not None:
            self.strategy.close()
        if getattr(self, "_converge", None) is not None:
            self.result["throttle"] = {"max": max(self._converge.history, default=0.0), "steps": self._converge.history}
        host.vcpus.set_throttle(0.0)  # the guest runs at full speed again, wherever it is
        if not self.handed_over:
            if paused_here:
                host.vcpus.resume()  # nothing lost: the guest goes on here
            self.result["guest_on"] = "source"
        elif self.result["status"] != "completed" and not self.result["guest_on"].startswith("destination"):
            self.result["guest_on"] = "unknown: GO was sent but the destination did not confirm resuming"

    def _fill_stats(self) -> None:
        res = self.result
        s = BatchStats()
        for lane in self.lanes:  # including passes that broke off
            s.add(lane.totals)
        total_s = res["total_time_ms"] / 1000.0
        chan = self._chan
        sent = sum(lane.chan.bytes_sent for lane in self.lanes) if self.lanes else (chan.bytes_sent if chan else 0)
        res["passes"] = self.passes
        res["ram"].update(
            transferred_bytes=sent,
            zero_pages=s.zero_pages,
            normal_pages=s.normal_pages,
            normal_bytes=s.data_bytes,
            remaining_bytes=0 if res["status"] == "completed" else None,
            mbps=round(sent * 8 / total_s / 1e6, 3) if total_s else 0.0,
            guest_bytes_per_s=round(res["ram"]["total_bytes"] / total_s)
            if total_s and res["status"] == "completed"
            else None,
            dirty_pages_rate=round(self._dirty_rate() or 0.0, 1),
        )
        res["tags"].update(tagged_pages=s.tagged_pages, raw_bytes=s.tag_raw, wire_bytes=s.tag_wire)
        comps = [lane.builder.compressor for lane in self.lanes]
        res["wire"].update(
            bytes_sent=sent,
            bytes_received=chan.bytes_received if chan else 0,
            data_bytes=s.data_wire,
            tag_bytes=s.tag_wire,
            channels=len(self.lanes) or None,
            compression=None
            if not comps
            else {
                "mode": comps[0].mode,
                "batches_compressed": sum(c.batches_compressed for c in comps),
                "batches_raw": sum(c.batches_raw for c in comps),
            },
        )
