"""Frames for a thread that polls its own file descriptors: the fault
channel's.

The same sans-I/O ``Connection`` as ``FrameChannel``, without an event loop.
Postcopy's fault latency is a chain of hand-overs of the interpreter lock
between the destination's busy threads (the vCPUs, the event loop of the
background stream, the fault thread); an event loop on the fault thread
added several to every fault (a wake-up callback, a task step, a selector
call per iteration).  Here a fault costs one ``poll`` for the event, one
``sendmsg`` for the REQUEST, one ``poll`` and one read for the answer."""

from migrate.errors import PeerTimeout, TransportError
from migrate.net.transport import peer_closed, receive_buffer
from migrate.protocol import frames as fr


class BlockingFrames:
    def __init__(self, sock, conn, io, timeout: float, stop_fd: int | None = None):
        """``io``: the connection's PlainIO or TlsIO (its TLS state goes on).
        ``stop_fd``: once readable, a send waiting for room gives up."""
        sock.setblocking(False)
        self.sock, self.conn, self.io = sock, conn, io
        self.timeout = timeout
        self.stop_fd = stop_fd
        self._buf = receive_buffer()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._header: fr.Header | None = None  # parsed once: the connection counts each header
        self.bytes_received = 0
        self.bytes_sent = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame) -> None:
        buffers = self.conn.send(frame)
        try:
            self.io.send_parts_blocking(buffers, self.timeout, self.stop_fd)
        except TimeoutError:
            raise PeerTimeout(f"peer accepted no data for {self.timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"connection lost while sending {frame.type.name}: {exc.strerror or exc}") from None
        self.bytes_sent += sum(len(b) for b in buffers)

    def frames(self):
        """Read what has arrived and yield each whole frame, checked by the
        connection's state machine.  A frame's fields are views into the
        buffer: use each before asking for the next."""
        while True:
            if not self._read():
                return
            while (frame := self._next()) is not None:
                yield frame
            if not self.io.buffered():
                return

    def _read(self) -> bool:
        """False when nothing had arrived yet."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < max(self._need(), 1 << 16):  # the partial frame to the front
            remaining = self._end - self._start
            self._view[:remaining] = self._view[self._start : self._end]
            self._start, self._end = 0, remaining
        try:
            n = self.io.recv_nowait(self._view[self._end :])
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"connection lost: {exc.strerror or exc}") from None
        if n is None:
            return False
        if n == 0:
            got = self._end - self._start
            raise peer_closed(got, got + self._need())
        self._end += n
        self.bytes_received += n
        return True

    def _need(self) -> int:
        """Bytes of the partial frame not here yet (its header's at least)."""
        have = self._end - self._start
        total = self._header.total if self._header is not None else fr.HEADER_SIZE
        return max(0, total - have)

    def _next(self):
        have = self._end - self._start
        if self._header is None:
            if have < fr.HEADER_SIZE:
                return None
            self._header = self.conn.parse_header(self._view[self._start : self._start + fr.HEADER_SIZE])
        header = self._header
        total = header.total
        if have < total:
            return None
        base = self._start + fr.HEADER_SIZE
        body = base + header.meta_len + header.payload_len
        meta = self._view[base : base + header.meta_len]
        payload = self._view[base + header.meta_len : body]
        trailer = self._view[body : self._start + total]
        self._start += total
        self._header = None
        return self.conn.receive(header, meta, payload, trailer)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
