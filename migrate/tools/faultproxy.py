"""A fault-injecting TCP proxy for mte-migrate streams, on loopback.

It sits between a source and a destination, forwards every connection it
accepts to the destination, follows the frame stream in both directions by
the header lengths (so it knows where each frame starts and what type it is),
and injects one fault when the chosen phase is reached::

    python3 -m migrate.tools.faultproxy --listen 127.0.0.1:0 --target HOST:PORT \\
        --fault cut --at bulk

prints ``listening on HOST:PORT`` (point the source there), then
``phase PHASE reached`` when the trigger fires.  Used in-process by
tests/test_faults.py through :class:`FaultProxy` / :class:`ProxyThread`.

Faults (applied to the *trigger frame*, see the phases below):

``cut``       close every proxied connection at once with a TCP reset, both
              sides, before the trigger frame is forwarded.
``flip``      forward the trigger frame with one byte inverted (XOR 0xFF): the
              middle byte of its payload, or the last byte of its meta when
              it has no payload.
``truncate``  forward the first half of the trigger frame (header + meta +
              payload, cut at half its total length), then close that
              connection (FIN, both sides).  Other connections go on.
``stall``     stop forwarding in both directions on every connection, before
              the trigger frame; the sockets stay open (and unread, so the
              senders' buffers fill) until the proxy is closed, or with
              ``--stall-s S`` for S seconds: then everything moves on as if
              nothing happened (connections opened meanwhile wait too).
``kill-dest`` / ``kill-source``: the proxy freezes every connection before
              the trigger frame and reports the phase: in-process through the
              ``on_phase`` callback (which kills the process and returns), on
              the command line by printing the line and waiting ``--hold``
              seconds for the caller to kill it.  Then it closes every
              connection as the dead side's kernel would: the trigger frame
              and anything else not yet forwarded is lost, the surviving side
              sees its connections end (FIN).  After ``kill-dest`` the proxy
              stops listening: a new connection is refused, as at the dead
              destination's port.
``tamper``    an attacker on the path (phases ``bulk`` and ``dirty`` only): the
              trigger PAGES frame (the first with data) is held whole,
              decoded, one byte of its first data page inverted, and
              re-encoded with every CRC recomputed (the frame's own data
              CRC too), so no checksum can tell; a MAC trailer is passed on
              as it came (nobody on the path can make one).  Later the
              destination's CONFIRM is rewritten to carry the digests the
              source's COMPLETE announced, so the completion check agrees.
              Without --psk-file this gets the altered guest resumed on the
              destination; with it, the destination refuses the PAGES frame.
``none``      inject nothing; report every phase marker as it passes.

Connections accepted after the fault (a source's recovery or retry) are
forwarded as usual after ``cut``, ``truncate``, ``flip`` and ``kill-source``
(the proxy resets connections, it does not keep the path down; after
``kill-dest`` they are refused); during a ``stall`` they are accepted and held
open, never forwarded (with ``--stall-s``, until the stall ends).  The proxy reads plaintext frames: it cannot follow a
TLS stream (it forwards it, but no phase is ever recognised).

Phases (``--at``), mapped to the stream:

``handshake`` / ``handshake:HELLO``   the HELLO frame (source -> destination);
``handshake:WELCOME``                 the WELCOME answering HELLO.
``bulk``          the first PAGES frame of pass 0 (``p`` in its msgpack meta)
                  that starts after ``--bulk-bytes`` bytes (whole frames) of
                  pass-0 PAGES frames have passed, counted over all connections.
``dirty``         the first PAGES frame of a pass >= 1 (every channel ends
                  pass 0 with PASS_END before any channel starts pass 1).  The
                  proxy cannot know whether that pass is the final one; pick
                  options that make at least one dirty pass (a running guest,
                  a bandwidth cap, ``--max-passes`` >= 1).
``stop-and-copy`` the PASS_END that ends the final pass on the control
                  connection.  The proxy recognises it by what follows: it
                  holds every PASS_END on the control connection until the
                  next frame header arrives there; if that is STATE, the held
                  PASS_END is the trigger frame (the source has paused its
                  vCPUs, sent its final pages and is about to send STATE),
                  otherwise it is forwarded unchanged -- as it is when nothing
                  follows within ``PASS_END_HOLD_S`` (after any other pass
                  the source waits for the destination's APPLIED).
``state``         the STATE frame.
``completion`` / ``completion:COMPLETE``   the COMPLETE frame;
``completion:CONFIRM``  the destination's CONFIRM;
``completion:GO``       the source's GO (it has given the guest up);
``completion:RESUMED``  the destination's RESUMED: the very last confirmation.
``postcopy``      after the postcopy switch (``--postcopy``): the first
                  POSTCOPY frame with a table (its pages' CRCs) from the
                  second on that follows a REQUEST from the destination,
                  so the destination has switched (its guest asked for a
                  page), some pages have landed and more are owed.  A
                  table alone does not show that: frames the destination
                  had not read yet when the link broke are lost with it.

Bounds: the proxy keeps at most one frame header + meta per direction
(``HEADER_SIZE + MAX_META``, checked on the header before any byte of the
meta is kept, with the same limits the destination applies), at most one
held PASS_END without payload, and asyncio's stream buffers (a 64 KiB read
limit, drained writes).  Payloads are streamed, never accumulated.  A stream
whose header fails those checks is forwarded raw from there on (the
destination will refuse it; the proxy only stops interpreting it).
"""

import argparse
import asyncio
import signal
import socket
import struct
import sys
import threading
import time

import msgpack
import zstandard

from migrate.engine.pages import content_crc
from migrate.protocol import frames as fr
from migrate.protocol.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_META,
    MAX_PAYLOAD,
    FrameType,
    frame_size,
    trailer_size,
)
from migrate.units import parse_size

FAULTS = ("none", "cut", "flip", "truncate", "stall", "kill-dest", "kill-source", "tamper")
#: how long a PASS_END is held for the frame after it (see ``stop-and-copy``)
PASS_END_HOLD_S = 1.0
PHASES = ("handshake", "bulk", "dirty", "stop-and-copy", "state", "completion", "postcopy")
POINTS = {"handshake": ("HELLO", "WELCOME"), "completion": ("COMPLETE", "CONFIRM", "GO", "RESUMED")}
UP, DOWN = "source->destination", "destination->source"
READ_CHUNK = 64 * 1024
DEFAULT_BULK_BYTES = 1 << 20


def parse_phase(text: str) -> str:
    """'completion' -> 'completion:COMPLETE', 'bulk' -> 'bulk', ...; ValueError if unknown."""
    phase, _, point = text.partition(":")
    phase = phase.strip().lower()
    if phase not in PHASES:
        raise ValueError(f"unknown phase {text!r}; known: {', '.join(PHASES)}")
    points = POINTS.get(phase)
    if points is None:
        if point:
            raise ValueError(f"phase {phase} takes no ':POINT'")
        return phase
    point = point.strip().upper() or points[0]
    if point not in points:
        raise ValueError(f"{phase} point must be one of {', '.join(points)}, got {point!r}")
    return f"{phase}:{point}"


class FrameInfo:
    """What the proxy knows about one frame once its header and meta are in."""

    __slots__ = ("index", "type", "name", "flags", "meta_len", "payload_len", "pass_no", "data_len")

    def __init__(self, index, ftype, flags, meta_len, payload_len):
        self.index = index
        self.type = ftype
        self.name = FrameType(ftype).name
        self.flags = flags
        self.meta_len = meta_len
        self.payload_len = payload_len
        self.pass_no = None
        self.data_len = None  # a PAGES frame's data bytes ("dl")

    @property
    def trailer_len(self) -> int:
        return trailer_size(self.flags)

    @property
    def total(self) -> int:
        return frame_size(self.flags, self.meta_len, self.payload_len)


class FrameScanner:
    """Splits one direction of a connection at frame boundaries without
    copying payloads.  ``feed(data)`` yields units:

    - ``("frame", info, head)`` when a frame's header and meta are complete
      (``head`` is those bytes);
    - ``("payload", info, chunk, offset)`` for pieces of its payload (and
      then of its MAC trailer, at offsets from ``info.payload_len`` on);
    - ``("raw", None, chunk)`` once the stream could not be parsed."""

    def __init__(self):
        self._head = bytearray()
        self._info = None
        self._payload_left = 0
        self.frames = 0
        self.broken = None

    def _check_header(self) -> str | None:
        magic, ftype, flags, meta_len, payload_len, _crc = HEADER.unpack(bytes(self._head[:HEADER_SIZE]))
        if magic != MAGIC:
            return f"bad magic {bytes(magic)!r}"
        try:
            FrameType(ftype)
        except ValueError:
            return f"unknown frame type {ftype}"
        if meta_len > MAX_META:
            return f"meta length {meta_len} > {MAX_META}"
        if payload_len > MAX_PAYLOAD:
            return f"payload length {payload_len} > {MAX_PAYLOAD}"
        self._info = FrameInfo(self.frames, ftype, flags, meta_len, payload_len)
        return None

    def feed(self, data):
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self.broken:
                yield ("raw", None, view[pos:])
                return
            if self._payload_left:
                info = self._info
                n = min(self._payload_left, end - pos)
                yield ("payload", info, view[pos : pos + n], info.payload_len + info.trailer_len - self._payload_left)
                self._payload_left -= n
                pos += n
                continue
            if len(self._head) < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < HEADER_SIZE:
                    return
                reason = self._check_header()
                if reason:
                    self.broken = reason
                    head, self._head = bytes(self._head), bytearray()
                    yield ("raw", None, head)
                    continue
            info = self._info
            want = HEADER_SIZE + info.meta_len  # <= HEADER_SIZE + MAX_META, checked above
            take = min(want - len(self._head), end - pos)
            self._head += view[pos : pos + take]
            pos += take
            if len(self._head) < want:
                return
            head, self._head = bytes(self._head), bytearray()
            if info.type in (FrameType.PAGES, FrameType.PASS_END):
                try:
                    meta = msgpack.unpackb(head[HEADER_SIZE:], raw=False, strict_map_key=False)
                    p = meta.get("p") if isinstance(meta, dict) else None
                    info.pass_no = p if isinstance(p, int) and not isinstance(p, bool) else None
                    dl = meta.get("dl") if isinstance(meta, dict) else None
                    info.data_len = dl if isinstance(dl, int) and not isinstance(dl, bool) else None
                except Exception:
                    info.pass_no = None
            self.frames += 1
            self._payload_left = info.payload_len + info.trailer_len
            yield ("frame", info, head)


class Link:
    """One proxied connection: source side <-> destination side."""

    def __init__(self, index: int, src_reader, src_writer):
        self.index = index
        self.readers = {UP: src_reader, DOWN: None}
        self.writers = {UP: None, DOWN: src_writer}  # writer *towards* the receiver of that direction
        self.scanners = {UP: FrameScanner(), DOWN: FrameScanner()}
        self.control = False  # carries HELLO (and data channel 0)
        self.closed = False
        self.held = None  # (info, head) of a held PASS_END (stop-and-copy)
        self.last_up = None  # type of the last frame source -> destination
        self.flip = {}  # direction -> payload offset to invert
        self.truncate = {}  # direction -> payload offset to stop at
        self.capture = {}  # direction -> [info, bytearray]: a whole frame held to be rewritten (tamper)
        self.tasks = []

    def transports(self):
        for w in (self.writers[UP], self.writers[DOWN]):
            if w is not None:
                yield w.transport


class FaultProxy:
    """The proxy.  ``target`` (host, port) is the destination; ``fault`` one
    of FAULTS; ``at`` a phase (see the module docstring).  ``on_phase(name)``
    is called in the proxy's loop when the trigger fires (before the fault is
    applied; for kill-* faults the proxy waits for it to return, then closes
    the connections as the dead side would).  Without it, kill-* faults wait
    ``hold_s`` seconds.  ``log(line)`` receives every event line."""

    def __init__(
        self,
        target,
        fault: str = "none",
        at: str | None = None,
        *,
        listen=("127.0.0.1", 0),
        bulk_bytes: int = DEFAULT_BULK_BYTES,
        on_phase=None,
        hold_s: float = 3.0,
        stall_s: float | None = None,
        log=None,
    ):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        if fault != "none" and not at:
            raise ValueError(f"fault {fault} needs a phase (--at)")
        if fault == "tamper" and parse_phase(at) not in ("bulk", "dirty"):
            raise ValueError("fault tamper rewrites a PAGES frame: use --at bulk or --at dirty")
        self.target = target
        self.fault = fault
        self.at = parse_phase(at) if at else None
        self.listen = listen
        self.bulk_bytes = bulk_bytes
        self.on_phase = on_phase
        self.hold_s = hold_s
        self.stall_s = stall_s
        self._tables = 0  # POSTCOPY frames with a table seen (phase postcopy)
        self._requested = False  # a REQUEST from the destination seen (it has switched)
        self._log = log
        self.links: list[Link] = []
        self.events: list[tuple[float, str]] = []
        self.seen: dict[str, float] = {}  # phase marker -> monotonic time first seen
        self.frames = {UP: {}, DOWN: {}}  # direction -> frame type name -> count
        self.fired_at: float | None = None
        self.fired_frame: str | None = None
        self.fired = None
        #: tamper: the guest page altered and how ({"page", "offset", "frame"}), once done
        self.tampered: dict | None = None
        self._announced: dict | None = None  # COMPLETE's digests, for the rewritten CONFIRM
        self._bulk_seen = 0
        self._frozen = False
        self._closing = False
        self._thaw = None
        self._server = None
        self.address = None

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self.fired = asyncio.Event()
        self._thaw = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, *self.listen, limit=READ_CHUNK)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    async def close(self) -> None:
        self._closing = True
        if self._thaw is not None:
            self._thaw.set()
        if self._server is not None:
            self._server.close()
        tasks = []
        for link in self.links:
            self._abort(link)
            tasks += link.tasks
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _note(self, text: str) -> None:
        self.events.append((time.monotonic(), text))
        if self._log is not None:
            self._log(text)

    # -- connections --------------------------------------------------------------------
    async def _accept(self, reader, writer) -> None:
        link = Link(len(self.links), reader, writer)
        self.links.append(link)
        if self._closing:
            self._abort(link)
            return
        if self._frozen and self.fault == "stall" and self.stall_s is None:  # accepted here, goes no further
            self._note(f"connection {link.index} accepted while stalled: held open, not forwarded")
            return
        if not await self._gate(link):  # kill-*: wait until the dead side's connections are closed
            self._abort(link)
            return
        try:
            dreader, dwriter = await asyncio.open_connection(*self.target, limit=READ_CHUNK)
        except OSError as exc:
            self._note(f"connection {link.index}: cannot reach the target: {exc.strerror or exc}")
            self._abort(link)
            return
        link.readers[DOWN], link.writers[UP] = dreader, dwriter
        self._note(f"connection {link.index} accepted")
        if self._closing:
            self._abort(link)
            return
        link.tasks = [asyncio.ensure_future(self._pump(link, UP)), asyncio.ensure_future(self._pump(link, DOWN))]

    async def _gate(self, link) -> bool:
        """Wait while the proxy is frozen (stall, kill); False once this link is done."""
        while self._frozen and not self._closing:
            self._thaw.clear()
            await self._thaw.wait()
        return not (self._closing or link.closed)

    async def _pump(self, link: Link, d: str) -> None:
        reader, writer, scanner = link.readers[d], link.writers[d], link.scanners[d]
        try:
            while True:
                if d == UP and link.held is not None:
                    try:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK), PASS_END_HOLD_S)
                    except TimeoutError:
                        # Nothing follows the held PASS_END: the source waits
                        # for the destination's APPLIED, so it did not end the
                        # final pass.
                        writer.write(link.held[1])
                        link.held = None
                        await writer.drain()
                        continue
                else:
                    data = await reader.read(READ_CHUNK)
                if not await self._gate(link):
                    return
                if not data:
                    break
                for unit in scanner.feed(data):
                    kind = unit[0]
                    if kind == "frame":
                        out = await self._on_frame(link, d, unit[1], unit[2])
                    elif kind == "payload":
                        out = self._on_payload(link, d, unit[1], unit[2], unit[3])
                    else:
                        out = unit[2]
                        if scanner.broken and not getattr(scanner, "_noted", False):
                            scanner._noted = True
                            self._note(
                                f"connection {link.index} {d}: not a frame stream any more "
                                f"({scanner.broken}): forwarding raw"
                            )
                    if out is None:  # the fault took over this link
                        await self._gate(link)
                        return
                    if not await self._gate(link):
                        return
                    if out:
                        writer.write(out)
                        await writer.drain()
                    if link.closed:
                        return
            # end of stream from this direction's sender
            if not await self._gate(link):
                return
            if d == UP and link.held is not None:
                writer.write(link.held[1])
                link.held = None
            self._note(f"connection {link.index}: {'source' if d == UP else 'destination'} closed")
            self._close(link)
        except (ConnectionError, OSError) as exc:
            if not link.closed and not self._closing:
                self._note(f"connection {link.index} {d}: {type(exc).__name__}: passing the reset on")
                self._abort(link)

    # -- the frame stream ---------------------------------------------------------------
    def _marker(self, link: Link, d: str, info: FrameInfo) -> str | None:
        t = info.type
        if d == UP:
            if t == FrameType.HELLO:
                link.control = True
                return "handshake:HELLO"
            if t == FrameType.PAGES and info.pass_no == 0:
                before = self._bulk_seen
                self._bulk_seen += info.total
                return "bulk" if before >= self.bulk_bytes else None
            if t == FrameType.PAGES and info.pass_no is not None and info.pass_no >= 1:
                return "dirty"
            if t == FrameType.STATE:
                return "state"
            if t == FrameType.COMPLETE:
                return "completion:COMPLETE"
            if t == FrameType.GO:
                return "completion:GO"
            if t == FrameType.POSTCOPY and info.payload_len:
                self._tables += 1
                if self._tables >= 2 and self._requested and "postcopy" not in self.seen:
                    return "postcopy"
                return None
        else:
            if t == FrameType.WELCOME and link.control:
                return "handshake:WELCOME"
            if t == FrameType.CONFIRM:
                return "completion:CONFIRM"
            if t == FrameType.RESUMED:
                return "completion:RESUMED"
            if t == FrameType.REQUEST:
                self._requested = True
        return None

    def _see(self, marker: str, link: Link, d: str, info: FrameInfo) -> None:
        if marker not in self.seen:
            self.seen[marker] = time.monotonic()
            self._note(f"marker {marker}: {info.name} frame #{info.index} on connection {link.index}")
            if self.fault == "none" and self.at == marker and self.fired_at is None:
                self._fire(marker, link, d, info)

    def _armed(self) -> bool:
        return self.fault != "none" and self.fired_at is None

    async def _on_frame(self, link: Link, d: str, info: FrameInfo, head: bytes):
        """Bytes to forward for this frame's header + meta, or None when the
        fault has taken the link over."""
        counts = self.frames[d]
        counts[info.name] = counts.get(info.name, 0) + 1
        out = b""
        if d == UP and link.control:
            if link.held is not None:  # a held PASS_END: was it the final pass's?
                held_info, held_head = link.held
                link.held = None
                if info.type == FrameType.STATE:
                    self._see("stop-and-copy", link, d, held_info)
                    if self._armed() and self.at == "stop-and-copy":
                        out = await self._inject("stop-and-copy", link, d, held_info, held_head)
                        if out is None:
                            return None
                    else:
                        out = held_head
                else:
                    out = held_head
            elif info.type == FrameType.STATE and link.last_up == FrameType.PASS_END:
                self._see("stop-and-copy", link, d, info)
            if (
                info.type == FrameType.PASS_END
                and info.payload_len == 0
                and self._armed()
                and self.at == "stop-and-copy"
            ):
                link.held = (info, head)
                link.last_up = info.type
                return out
        if d == UP:
            link.last_up = info.type
        if self.fault == "tamper":
            rewrite = self._tamper_watch(link, d, info, head)
            if rewrite is not None:
                return out + rewrite
        marker = self._marker(link, d, info)
        if marker is None:
            return out + head
        if marker == "bulk" or marker == "dirty":
            hit = marker not in self.seen
        else:
            hit = True
        self._see(marker, link, d, info)
        if self.fault == "tamper" and self._armed() and self.at == marker and info.data_len:
            self._fire(marker, link, d, info)
            return out + self._hold(link, d, info, head)
        if hit and self._armed() and self.at == marker and self.fault != "tamper":
            injected = await self._inject(marker, link, d, info, head)
            return None if injected is None else out + injected
        return out + head

    def _fire(self, phase: str, link: Link, d: str, info: FrameInfo) -> None:
        self.fired_at = time.monotonic()
        self.fired_frame = info.name
        self._note(f"phase {phase} reached: {info.name} frame #{info.index} on connection {link.index} ({d})")
        if self.fired is not None:
            self.fired.set()
        if self.on_phase is not None:
            self.on_phase(phase)

    async def _inject(self, phase: str, link: Link, d: str, info: FrameInfo, head: bytes):
        """Apply the fault to the trigger frame (its header + meta in ``head``,
        its payload still to come).  Bytes to forward now, or None."""
        fault = self.fault
        if fault in ("stall", "kill-dest", "kill-source"):
            self._frozen = True  # nothing moves from here on
        self._fire(phase, link, d, info)  # kill-*: on_phase kills the process here
        if fault == "cut":
            self._note(f"fault cut: every connection reset before {info.name}")
            for lk in self.links:
                self._abort(lk)
            return None
        if fault == "stall" and self.stall_s is not None:
            self._note(f"fault stall: nothing forwarded from {info.name} on for {self.stall_s:g} s")
            await asyncio.sleep(self.stall_s)
            self._note("fault stall: over, forwarding again")
            self._frozen = False
            self._thaw.set()
            return head
        if fault == "stall":
            self._note(f"fault stall: nothing forwarded from {info.name} on; sockets stay open")
            return None
        if fault in ("kill-dest", "kill-source"):
            dead = "destination" if fault == "kill-dest" else "source"
            if self.on_phase is None:
                await asyncio.sleep(self.hold_s)
            self._note(
                f"fault {fault}: the {dead} is dead; {info.name} and everything in flight is lost, "
                f"the other side's connections close"
            )
            for lk in self.links:
                self._close_after_death(lk, dead)
            if dead == "destination" and self._server is not None:
                self._server.close()  # its port refuses connections now
            self._frozen = False
            self._thaw.set()
            return None
        if fault == "flip":
            if info.payload_len:
                link.flip[d] = info.payload_len // 2
                self._note(
                    f"fault flip: {info.name} payload byte {info.payload_len // 2} of {info.payload_len} inverted"
                )
                return head
            pos = len(head) - 1 if info.meta_len else HEADER_SIZE - 1
            where = f"meta byte {info.meta_len - 1}" if info.meta_len else "crc byte 3"
            self._note(f"fault flip: {info.name} {where} inverted")
            return head[:pos] + bytes([head[pos] ^ 0xFF]) + head[pos + 1 :]
        if fault == "truncate":
            cut = info.total // 2
            self._note(
                f"fault truncate: {cut} of {info.total} bytes of {info.name} forwarded, "
                f"then connection {link.index} closed"
            )
            if cut <= len(head) or info.payload_len == 0:
                link.writers[d].write(head[:cut])
                self._close(link)
                return None
            link.truncate[d] = cut - len(head)
            return head
        raise AssertionError(fault)

    # -- tamper: an attacker who rewrites a frame and fixes its checksums ----------------
    def _tamper_watch(self, link: Link, d: str, info: FrameInfo, head: bytes):
        """Learn the digests the source announces (COMPLETE); hold the
        CONFIRM that answers them.  Bytes to forward now, or None to go on
        as usual."""
        if d == UP and info.type == FrameType.COMPLETE and self.tampered:
            self._announced = _meta_of(head)
        elif d == DOWN and info.type == FrameType.CONFIRM and self._announced:
            return self._hold(link, d, info, head)
        return None

    def _hold(self, link: Link, d: str, info: FrameInfo, head: bytes) -> bytes:
        """Keep the whole frame (bounded by the frame limits) to rewrite it."""
        link.capture[d] = [info, bytearray(head)]
        return self._captured(link, d, b"")

    def _captured(self, link: Link, d: str, chunk) -> bytes:
        info, raw = link.capture[d]
        raw += chunk
        if len(raw) < info.total:
            return b""
        del link.capture[d]
        return self._forge_pages(bytes(raw)) if info.type == FrameType.PAGES else self._forge_confirm(bytes(raw))

    def _forge_pages(self, raw: bytes) -> bytes:
        header, meta, payload, trailer = _split(raw)
        frame = fr.decode(header, meta, payload)
        data_pages = [i for i, f in enumerate(frame.flags) if not f & (fr.PAGE_ZERO | fr.PAGE_KEEP)]
        data = bytearray(
            zstandard.ZstdDecompressor().decompress(bytes(frame.data), max_output_size=len(data_pages) * fr.PAGE_SIZE)
            if frame.data_compressed
            else frame.data
        )
        offset = 123  # any byte will do
        data[offset] ^= 0xFF
        frame.data, frame.data_compressed = bytes(data), False
        if frame.dcrc is not None:
            frame.dcrc = content_crc(frame.flags, frame.data)  # what the sender puts there
        self.tampered = {"page": _guest_page(frame.ranges, data_pages[0]), "offset": offset, "frame": "PAGES"}
        self._note(
            f"fault tamper: byte {offset} of guest page {self.tampered['page']} inverted in a PAGES frame, "
            f"its CRCs recomputed{'; its MAC passed on unchanged' if trailer else ''}"
        )
        return _reencode(frame, header, trailer)

    def _forge_confirm(self, raw: bytes) -> bytes:
        header, meta, payload, trailer = _split(raw)
        frame = fr.decode(header, meta, payload)
        frame.data_digest, frame.tag_digest = self._announced.get("d"), self._announced.get("t")
        self._note("fault tamper: CONFIRM rewritten to carry the digests COMPLETE announced")
        return _reencode(frame, header, trailer)

    def _on_payload(self, link: Link, d: str, info: FrameInfo, chunk, offset: int):
        if d in link.capture:
            return self._captured(link, d, chunk)
        stop = link.truncate.get(d)
        if stop is not None and offset + len(chunk) >= stop:
            link.writers[d].write(chunk[: stop - offset])
            del link.truncate[d]
            self._close(link)
            return None
        at = link.flip.get(d)
        if at is not None and offset <= at < offset + len(chunk):
            chunk = bytearray(chunk)
            chunk[at - offset] ^= 0xFF
            del link.flip[d]
        return chunk

    # -- closing --------------------------------------------------------------------------
    def _close(self, link: Link) -> None:
        """Orderly close of both sides (buffered bytes go out, then FIN)."""
        if link.closed:
            return
        link.closed = True
        for t in link.transports():
            t.close()

    def _abort(self, link: Link) -> None:
        """Both sides reset at once (SO_LINGER 0: RST, nothing buffered goes out)."""
        link.closed = True
        for t in link.transports():
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            t.abort()

    def _close_after_death(self, link: Link, dead: str) -> None:
        if link.closed:
            return
        link.closed = True
        dead_w = link.writers[UP] if dead == "destination" else link.writers[DOWN]
        live_w = link.writers[DOWN] if dead == "destination" else link.writers[UP]
        if dead_w is not None:
            dead_w.transport.abort()
        if live_w is not None:
            live_w.transport.close()


def _meta_of(head: bytes) -> dict:
    try:
        meta = msgpack.unpackb(head[HEADER_SIZE:], raw=False, strict_map_key=False)
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


def _split(raw: bytes):
    header = fr.parse_header(raw[:HEADER_SIZE])
    body = HEADER_SIZE + header.meta_len
    end = body + header.payload_len
    return header, raw[HEADER_SIZE:body], raw[body:end], raw[end:]


def _guest_page(ranges, index: int) -> int:
    """The guest page at position ``index`` of a batch."""
    for first, count in ranges:
        if index < count:
            return first + index
        index -= count
    raise ValueError("index beyond the batch")


class _Replayed:
    """Stands in for a MAC key nobody on the path has: the frame's old MAC."""

    def __init__(self, trailer: bytes):
        self.trailer = trailer

    def tag(self, head, meta, payload) -> bytes:
        return self.trailer


def _reencode(frame, header, trailer: bytes) -> bytes:
    """The frame encoded with the checksum coverage it came with."""
    if not header.flags & fr.FLAG_CRC:
        mode = "none"
    elif header.flags & fr.FLAG_CRC_META_ONLY and not getattr(frame, "self_checked", False):
        mode = "meta"
    else:
        mode = "full"
    return b"".join(bytes(b) for b in fr.encode(frame, mode, _Replayed(trailer) if trailer else None))


class ProxyThread:
    """A FaultProxy on its own thread and event loop, for tests that drive
    processes from ordinary threads.  ``fired`` is a threading.Event."""

    def __init__(self, target, fault="none", at=None, **kw):
        self.fired = threading.Event()
        user_cb = kw.pop("on_phase", None)

        def on_phase(name):
            if user_cb is not None:
                user_cb(name)
            self.fired.set()

        self._loop = asyncio.new_event_loop()
        self.proxy = FaultProxy(target, fault, at, on_phase=on_phase, **kw)
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        self.address = self.proxy.address

    def _run(self):
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.proxy.start())
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.proxy.close())
        rest = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for t in rest:
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        self._loop.close()

    @property
    def events(self):
        return list(self.proxy.events)

    def close(self):
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m migrate.tools.faultproxy",
        description="Fault-injecting TCP proxy for mte-migrate streams (loopback testing).",
        epilog="Phases: handshake[:HELLO|WELCOME], bulk, dirty, stop-and-copy, state, "
        "completion[:COMPLETE|CONFIRM|GO|RESUMED], postcopy. See the module docstring.",
    )
    p.add_argument(
        "--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="where the source connects (port 0: any)"
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the destination's address")
    p.add_argument("--fault", default="none", choices=FAULTS)
    p.add_argument("--at", metavar="PHASE", help="when to inject it")
    p.add_argument(
        "--bulk-bytes",
        default=str(DEFAULT_BULK_BYTES),
        metavar="SIZE",
        help="bulk: pass-0 PAGES bytes to let through first (default 1MiB)",
    )
    p.add_argument(
        "--hold",
        type=float,
        default=3.0,
        metavar="S",
        help="kill-*: seconds to wait for the caller to kill the process (default 3)",
    )
    p.add_argument("--stall-s", type=float, metavar="S", help="stall: forward again after S seconds (default: never)")
    p.add_argument("--verbose", "-v", action="store_true", help="every event on stderr")
    args = p.parse_args(argv)
    try:
        listen = _address(args.listen, "--listen")
        target = _address(args.target, "--target")
        bulk = parse_size(args.bulk_bytes, "--bulk-bytes")
        if args.at:
            parse_phase(args.at)
        if args.fault != "none" and not args.at:
            raise ValueError(f"--fault {args.fault} needs --at PHASE")
    except ValueError as exc:
        print(f"faultproxy: error: {exc}", file=sys.stderr)
        return 2

    def log(line):
        if line.startswith("phase "):
            print(line.split(" reached")[0] + " reached", flush=True)  # 'phase PHASE reached'
        if args.verbose or line.startswith(("phase ", "fault ")):
            print(f"faultproxy: {line}", file=sys.stderr, flush=True)

    async def run():
        proxy = FaultProxy(
            target,
            args.fault,
            args.at,
            listen=listen,
            bulk_bytes=bulk,
            hold_s=args.hold,
            stall_s=args.stall_s,
            log=log,
        )
        try:
            host, port = await proxy.start()
        except OSError as exc:
            print(f"faultproxy: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.close()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
