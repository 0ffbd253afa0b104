"""The thin asyncio layer: frames over a non-blocking TCP socket.

Reads land in one reused buffer (no allocation per read: asyncio's
StreamReader, reading 1 MiB at a time, swung between 0.9 and 4 GB/s here as
malloc mapped and unmapped memory on every read); a frame's meta and payload are views into it, valid until the
next receive.  Sends go straight from the frame's buffers (guest RAM views or
the batch scratch), gathered into one sendmsg() a frame.  Every receive is bounded in time
(the peer timeout) and in size (the frame limits, checked on the header
before the payload is read)."""

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import mmap
import os
import socket
import time

from migrate.errors import PeerTimeout, TransportError
from migrate.net.tls import PlainIO, TlsIO, fd_ready
from migrate.protocol import frames as fr

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: struct tcp_info: the offset of tcpi_rwnd_limited (microseconds), and a
#: length that reaches past it
_TCPI_RWND_LIMITED, _TCPI_LEN = 176, 232
#: tmpfs's huge page: the splice into guest RAM writes whole ones at once
_HUGE_PAGE = 2 << 20

DEFAULT_TIMEOUT = object()
BUFFER_SIZE = fr.HEADER_SIZE + fr.MAX_META + fr.MAX_PAYLOAD + fr.MAC_SIZE + (1 << 20)


def receive_buffer(size: int = BUFFER_SIZE) -> mmap.mmap:
    """A connection's receive buffer, its pages taken only as frames fill
    them: an anonymous mapping.  bytearray(size) writes every byte, 5 MiB of
    memory and 3.5 ms a connection, most of it never used by a connection
    whose frames are small or spliced into guest RAM."""
    return mmap.mmap(-1, size)


class FrameChannel:
    def __init__(self, sock: socket.socket, conn, timeout: float, limiter=None, io=None):
        sock.setblocking(False)
        self.sock = sock
        self.conn = conn
        self.timeout = timeout
        self.limiter = limiter
        self.loop = asyncio.get_running_loop()
        self.io = io or PlainIO(self.loop, sock)  # or TlsIO: same calls, records in memory
        self._buf = receive_buffer()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.send_seconds = 0.0
        #: whether the last send found the socket full at some point
        self.waited_for_room = False
        self.last_activity = time.monotonic()
        self.closed = False
        #: placer(fields, data_len) -> pages.Placement or None: where the data
        #: of a self-checked PAGES frame goes straight from the socket, spliced
        #: or read into place (one copy into guest RAM instead of two).  Set,
        #: reads stop at the end of each frame so that payloads stay in the
        #: socket.
        self.placer = None
        self._pipe = None
        # One frame at a time: a task that sends while another waits for
        # room in the socket would put its bytes inside the other's frame.
        self._send_lock = asyncio.Lock()
        #: the type of a frame whose send stopped part-way (cancelled, timed
        #: out): the stream can carry nothing after it that a peer could parse
        self.cut_frame: str | None = None

    # -- sending --------------------------------------------------------------
    async def send(self, frame, paced: bool = True) -> int:
        """``paced=False``: past --max-bandwidth's limiter (a page a stopped
        vCPU waits for in postcopy; the background stream keeps to the cap)."""
        async with self._send_lock:
            if self.cut_frame is not None:
                raise TransportError(
                    f"cannot send {frame.type.name}: a {self.cut_frame} frame was cut off part-way on this connection"
                )
            buffers = self.conn.send(frame)  # the connection counts it sent (a MAC's sequence, too)
            n = sum(map(len, buffers))
            if self.limiter is not None and paced:
                try:
                    await self.limiter.wait(n)
                except BaseException:
                    # Nothing of it went out, but on a sealed stream the next
                    # frame would carry the wrong MAC sequence number.
                    if self.conn.sealed:
                        self.cut_frame = frame.type.name
                    raise
            t, waits = time.perf_counter(), self.io.room_waits
            try:
                async with asyncio.timeout(self.timeout):
                    await self.io.send_parts(buffers)
            except BaseException as exc:
                self.cut_frame = frame.type.name  # (conservative: perhaps no byte of it went)
                if isinstance(exc, TimeoutError):
                    raise PeerTimeout(f"peer accepted no data for {self.timeout:g} s") from None
                if isinstance(exc, (ConnectionError, OSError)):
                    raise TransportError(
                        f"connection lost while sending {frame.type.name}: {exc.strerror or exc}"
                    ) from None
                raise
            self.send_seconds += time.perf_counter() - t
            self.waited_for_room = self.io.room_waits != waits
            self.bytes_sent += n
            return n

    def receiver_limited_s(self) -> float | None:
        """Seconds this connection's sender has spent held back by the
        peer's TCP receive window (Linux's tcpi_rwnd_limited, since 4.10;
        counted in jiffies): the receiver, not the network, was slow.  None
        where the kernel does not say."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_LEN)
        except (OSError, AttributeError):
            return None
        if len(info) < _TCPI_RWND_LIMITED + 8:
            return None
        return int.from_bytes(info[_TCPI_RWND_LIMITED : _TCPI_RWND_LIMITED + 8], "little") / 1e6

    # -- receiving -----------------------------------------------------------
    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available at _start (exactly ``need``
        when a placer is set: nothing of the next payload is read ahead)."""
        if self._end - self._start >= need:
            return
        if self._start + need > len(self._buf):  # compact the partial frame to the front
            remaining = self._end - self._start
            self._view[:remaining] = self._view[self._start : self._end]
            self._start, self._end = 0, remaining
        while self._end - self._start < need:
            limit = self._start + need if self.placer is not None else len(self._buf)
            try:
                n = await self.io.recv_into(self._view[self._end : limit])
            except (ConnectionError, OSError) as exc:
                raise TransportError(f"connection lost: {exc.strerror or exc}") from None
            if n == 0:
                raise peer_closed(self._end - self._start, need)
            self._end += n
            self.bytes_received += n
            self.last_activity = time.monotonic()

    async def recv(self, timeout=DEFAULT_TIMEOUT):
        """The next frame, checked by the connection's state machine.
        ``timeout=None`` waits for ever (for a watcher of an idle peer)."""
        timeout = self.timeout if timeout is DEFAULT_TIMEOUT else timeout
        try:
            async with asyncio.timeout(timeout):
                await self._fill(fr.HEADER_SIZE)
                header = self.conn.parse_header(self._view[self._start : self._start + fr.HEADER_SIZE])
                if (
                    self.placer is not None
                    and header.type == fr.FrameType.PAGES
                    and header.flags & fr.FLAG_CRC_META_ONLY
                    and isinstance(self.io, PlainIO)
                    and not self.conn.sealed  # a MAC is checked before any byte is used
                ):
                    landed = await self._recv_landing(header)
                    if landed is not None:
                        return landed
                total = header.total
                await self._fill(total)
        except TimeoutError:
            raise PeerTimeout(f"peer sent nothing for {timeout:g} s") from None
        base = self._start + fr.HEADER_SIZE
        body = base + header.meta_len + header.payload_len
        meta = self._view[base : base + header.meta_len]
        payload = self._view[base + header.meta_len : body]
        trailer = self._view[body : self._start + total]
        self._start += total
        return self.conn.receive(header, meta, payload, trailer)

    async def _recv_landing(self, header):
        """Read a self-checked PAGES frame's meta; if the placer takes its
        data, splice the data into guest RAM, read the tags, and return the
        frame (``landed``).  None: read it the usual way (the meta stays in
        the buffer).  Nothing lands before the meta, the transition and the
        page bounds are checked; the data itself is checked on the landed
        pages by the applier, as for any whole-chunk frame."""
        head = fr.HEADER_SIZE + header.meta_len
        await self._fill(head)
        meta = self._view[self._start + fr.HEADER_SIZE : self._start + head]
        fields, dl = self.conn.receive_pages_head(header, meta)
        target = self.placer(fields, dl)
        if target is None:
            return None
        frame = self.conn.accept_landing(fields)
        self._start += head
        fd, offset, lock, landed, view = target
        have = min(self._end - self._start, dl)  # none when reads stop at frame ends
        if view is not None:
            await self._receive_into(view, have, landed)
        else:
            if have:
                with lock:
                    os.pwrite(fd, self._view[self._start : self._start + have], offset)
                self._start += have
                landed(have)
            await self._splice(fd, offset + have, dl - have, lock, lambda n: landed(have + n))
        tags_len = header.payload_len - dl
        await self._fill(tags_len)
        frame.tags = bytes(self._view[self._start : self._start + tags_len])
        self._start += tags_len
        frame.check_tags()
        return frame

    async def _splice(self, fd: int, offset: int, length: int, lock=None, landed=None) -> None:
        """Move ``length`` bytes from the socket to ``fd`` at ``offset``
        through a pipe: the kernel hands the socket's pages to the pipe and
        copies them once, into the file.

        While the socket has bytes, the pipe gathers up to the end of a huge
        page before they are written: tmpfs clears the rest of a fresh huge
        page that a write covers only in part, and the two channels' writes
        queue on the file's lock -- written 2 MiB at once, the random image
        landed with 6-9 % less destination CPU (docs/results).  The writes
        hold ``lock``, the file's writers' lock: in the kernel a second
        writer would spin on the file's own lock while the first copies.
        ``landed`` is called with the count of bytes written so far after
        each write, outside the lock."""
        if self._pipe is None:
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass  # a smaller pipe only means more calls
            self._pipe = (r, w)
        r, w = self._pipe
        sfd = self.sock.fileno()
        lock = lock or contextlib.nullcontext()
        done = 0
        while done < length:
            want = min(length - done, _HUGE_PAGE - (offset + done) % _HUGE_PAGE)
            held = 0  # bytes in the pipe
            while held < want:
                try:
                    n = os.splice(sfd, w, want - held, flags=os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE)
                except BlockingIOError:
                    if held:
                        break  # nothing more yet, or the pipe is full: write what it holds
                    await self._readable()
                    continue
                except OSError as exc:
                    raise TransportError(f"connection lost: {exc.strerror or exc}") from None
                if n == 0:
                    raise TransportError(
                        f"peer closed the connection inside a frame ({done + held} of {length} data bytes)"
                    )
                held += n
            moved = 0
            with lock:
                while moved < held:
                    moved += os.splice(r, fd, held - moved, offset_dst=offset + done + moved)
            done += held
            self.bytes_received += held
            self.last_activity = time.monotonic()
            if landed is not None:
                landed(done)

    async def _receive_into(self, view, have: int, landed) -> None:
        """Receive a frame's data straight into ``view`` (a view of guest
        RAM's mapping), its first ``have`` bytes from the buffer: one copy,
        from the socket into place.  No lock: a store through the mapping
        takes none of the file's, so the channels read (and fault fresh
        pages in) at once.  ``landed`` is called with the count of bytes in
        place after each read."""
        done, total = 0, len(view)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
            done = have
            landed(done)
        while done < total:
            try:
                n = self.sock.recv_into(view[done:])
            except BlockingIOError:
                await self._readable()
                continue
            except OSError as exc:
                raise TransportError(f"connection lost: {exc.strerror or exc}") from None
            if n == 0:
                raise TransportError(f"peer closed the connection inside a frame ({done} of {total} data bytes)")
            done += n
            self.bytes_received += n
            self.last_activity = time.monotonic()
            landed(done)

    def _drain(self, limit: int = 64 << 20) -> None:
        """Read what the peer already sent and nobody will: closing a socket
        with unread data makes the kernel reset the connection, and a reset
        can destroy the ERROR frame just sent to say why (reads stop at frame
        ends while a placer is set, so the rest of a stream stays queued)."""
        if self.placer is None:
            return
        try:
            while limit > 0:
                n = self.sock.recv_into(self._view, min(len(self._view), limit), socket.MSG_DONTWAIT)
                if n == 0:
                    return
                limit -= n
        except OSError:  # nothing more queued (EAGAIN), or already gone
            pass

    async def _readable(self) -> None:
        await fd_ready(self.loop, self.sock.fileno())

    async def close_gracefully(self, grace: float) -> None:
        """Close after saying why we fail: a FIN behind what was sent, then
        read and drop what the peer still sends until it closes too, or for
        ``grace`` seconds.  Closed with data unread, the socket resets the
        connection at once, and a proxy that passes the reset on (or drops
        the link) can destroy the ERROR before the peer reads it: with the
        kernel sizing its receive buffer, megabytes are in flight then."""
        if self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(grace):
                while await self.io.recv_into(self._view):
                    pass
        except (TimeoutError, OSError):
            pass
        self.close()

    def close(self) -> None:
        """Close the socket -- after any callbacks the loop has already queued
        for it (a send or receive just cancelled by a timeout still has to
        unregister its file descriptor; closing first makes that fail)."""
        if self.closed:
            return
        self.closed = True
        try:
            running = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            running = False
        if running:
            self.loop.call_soon(self._close_now)
        else:
            self._close_now()

    def _close_now(self) -> None:
        self._drain()
        try:
            self.sock.close()
        except OSError:
            pass
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)
            self._pipe = None


def peer_closed(got: int, need: int) -> TransportError:
    """The peer closed its end with ``got`` bytes of a ``need``-byte frame here."""
    where = "between frames" if got == 0 else f"inside a frame ({got} of {need} bytes)"
    return TransportError(f"peer closed the connection {where}")


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def connect(host: str, port: int, timeout: float, congestion: str = "system") -> socket.socket:
    """A connected, tuned socket; ``congestion``: see choose_congestion."""
    loop = asyncio.get_running_loop()
    try:
        # An address needs no resolver: asked of the loop, it would start
        # the executor's first thread (3 ms of the set-up) to be told so.
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise TransportError(f"cannot resolve {host}: {exc.strerror}") from None
    last = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, addr)
            tune(sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
            continue
        try:
            choose_congestion(sock, congestion)
        except TransportError:
            sock.close()
            raise
        return sock
    if isinstance(last, TimeoutError):
        reason = "timed out"
    elif getattr(last, "errno", None):
        reason = os.strerror(last.errno).lower()
    else:
        reason = str(last)
    error = TransportError(f"cannot open a connection to {host}:{port}: {reason}")
    # Nothing listens there: the peer process is gone (not merely silent).
    error.refused = getattr(last, "errno", None) == errno.ECONNREFUSED
    raise error


async def accept(listener: socket.socket) -> tuple[socket.socket, object]:
    """The next connection on the non-blocking ``listener``.

    Not ``loop.sock_accept``: on Python 3.11 its reader can fire in the same
    loop turn as a cancellation, accept a connection, and fail setting the
    result of the cancelled future (a logged traceback and a lost socket).
    Here the connection is taken only by a caller still waiting for it."""
    loop = asyncio.get_running_loop()
    fd = listener.fileno()
    while True:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            pass
        else:
            sock.setblocking(False)
            return sock, peer
        await fd_ready(loop, fd)


def tune(sock: socket.socket) -> None:
    """No delay for small frames.  The buffer sizes are left to the kernel:
    a size set by hand turns its tuning off, and a receive buffer fixed at
    4 MiB (its window half that) held a 1 GiB migration over loopback back
    on ACKs: with the kernel's tuning (up to tcp_rmem's maximum, 32 MiB
    here) the median of 12 interleaved runs fell from 413 to 357 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
#: for a stream within one host: loss-based algorithms, the first one the kernel offers
WITHIN_HOST_CONGESTION = ("cubic", "reno")
_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def within_host(sock: socket.socket) -> bool:
    """Whether both ends of a connected socket are on this host: the peer's
    address is a loopback one, or our own."""
    try:
        peer, own = sock.getpeername()[0], sock.getsockname()[0]
        addr = ipaddress.ip_address(peer)
    except (OSError, ValueError):
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr
    return addr.is_loopback or peer == own


def congestion_of(sock: socket.socket) -> str | None:
    """The connection's congestion control algorithm (None: not known)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, 16).split(b"\0", 1)[0].decode() or None
    except OSError:
        return None


def choose_congestion(sock: socket.socket, mode: str) -> str | None:
    """Set a connection's congestion control (see --tcp-congestion) and
    return the one it uses.  ``system``: the host's default, untouched.
    ``auto``: the same, except within one host, where a loss-based algorithm
    (cubic, else reno) replaces a model-based one: there is no network to
    model, and BBR, measuring a round trip of microseconds, kept its window
    at 24 segments of 64 KiB where cubic's grew to 72 -- the sender waits on
    the acknowledgements of a receiver that shares its cores (QEMU's streams
    over loopback were faster too with cubic as the system's default).  Any
    other word: that algorithm, or TransportError naming the ones the
    kernel offers."""
    if mode == "system":
        return congestion_of(sock)
    if mode == "auto":
        if within_host(sock) and congestion_of(sock) not in WITHIN_HOST_CONGESTION:
            for name in WITHIN_HOST_CONGESTION:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, name.encode())
                    break
        return congestion_of(sock)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, mode.encode())
    except OSError as exc:
        try:
            with open(_AVAILABLE) as f:
                offered = ", ".join(f.read().split()) or "none"
        except OSError:
            offered = "not known"
        raise TransportError(
            f"--tcp-congestion {mode}: the kernel refused it ({exc.strerror or exc}); it offers: {offered}"
        ) from None
    return congestion_of(sock)


#: TCP_NOTSENT_LOWAT (Linux 3.12); not every Python names it
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def bound_backlog(sock: socket.socket, nbytes: int) -> None:
    """Keep at most about ``nbytes`` queued in this socket's kernel buffers
    (send and receive; Linux doubles the figure for its bookkeeping).  For a
    stream something more urgent must not wait behind: what is queued
    cannot be taken back.  Best effort: a socket that refuses keeps its size."""
    for level, opt, value in (
        (socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes),
        (socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, nbytes // 4),
    ):
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


async def secure(sock: socket.socket, tls, server_side: bool, timeout: float):
    """The I/O object for a new connection: plain, or TLS after a handshake."""
    loop = asyncio.get_running_loop()
    if tls is None:
        return PlainIO(loop, sock)
    sock.setblocking(False)
    io = TlsIO(loop, sock, tls.context(server_side), server_side)
    try:
        async with asyncio.timeout(timeout):
            await io.handshake()
    except TimeoutError:
        raise PeerTimeout(f"TLS handshake took more than {timeout:g} s") from None
    except OSError as exc:
        raise TransportError(f"connection lost during the TLS handshake: {exc.strerror or exc}") from None
    return io
