"""Optional TLS from the standard library (--tls-cert, --tls-key, --tls-ca).

The transport works on raw non-blocking sockets (loop.sock_* calls), so TLS
runs through ssl.MemoryBIO: records are encrypted and decrypted in memory and
moved with the same loop calls.  Both sides present a certificate signed by
the CA and verify the other's (mutual TLS); host names are not checked, the
CA is the trust anchor."""

import select
import ssl
from dataclasses import dataclass

from migrate.errors import AuthError, ConfigError, TransportError

RECORD_READ = 256 * 1024


@dataclass
class TlsConfig:
    cert: str
    key: str
    ca: str

    def context(self, server_side: bool) -> ssl.SSLContext:
        purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
        try:
            ctx = ssl.create_default_context(purpose, cafile=self.ca)
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS set-up failed: {exc}") from None
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx


def from_options(cert, key, ca) -> TlsConfig | None:
    given = [x for x in (cert, key, ca) if x]
    if not given:
        return None
    if len(given) != 3:
        raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    return TlsConfig(cert, key, ca)


_IOV_MAX = 1024  # Linux's UIO_MAXIOV


def send_blocking(sock, buffers, timeout: float, stop_fd: int | None = None) -> None:
    """All of ``buffers`` on a non-blocking socket from a thread without an
    event loop: gathered sendmsg() calls, polling for room in between;
    TimeoutError if the peer takes nothing for ``timeout`` seconds, and
    InterruptedError once ``stop_fd`` is readable (the thread is told to end)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(views):
        try:
            n = sock.sendmsg(views[i : i + _IOV_MAX])
        except (BlockingIOError, InterruptedError):
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLOUT)
            if stop_fd is not None:
                poller.register(stop_fd, select.POLLIN)
            ready = poller.poll(timeout * 1000)
            if not ready:
                raise TimeoutError from None
            if stop_fd is not None and any(fd == stop_fd for fd, _ in ready):
                raise InterruptedError("told to stop while sending") from None
            continue
        i = advance(views, i, n)


def advance(views: list, i: int, n: int) -> int:
    """After a gathered send of ``n`` bytes from ``views[i:]``: the index of
    the first view not wholly sent, that view trimmed to what is left."""
    while n and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    if n:
        views[i] = views[i][n:]
    return i


async def fd_ready(loop, fd: int, write: bool = False) -> None:
    """Wait until ``fd`` is readable (``write``: writable) on ``loop``."""
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, _wake, fut)
    try:
        await fut
    finally:
        remove(fd)


def _wake(future) -> None:
    if not future.done():
        future.set_result(None)


class _Sends:
    """Sending on a non-blocking socket from an event loop, counting the
    times the socket was full (``room_waits``): a send that never waited
    for room went out as fast as this side gave it bytes, and says only
    that the link is at least that fast (see Compressor.observe_link)."""

    room_waits = 0

    async def _send_view(self, view) -> None:
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            view = view[n:]

    async def _writable(self) -> None:
        self.room_waits += 1
        await fd_ready(self.loop, self.sock.fileno(), write=True)


class PlainIO(_Sends):
    def __init__(self, loop, sock):
        self.loop, self.sock = loop, sock

    async def sendall(self, data) -> None:
        await self._send_view(memoryview(data).cast("B"))

    async def send_parts(self, buffers) -> None:
        """All of ``buffers``, in order, with one gathering sendmsg() while
        the socket has room: a frame's header, meta, data runs and tags in one
        system call, not one each (a batch of the mixed image has 64 runs)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        sock, i = self.sock, 0
        while i < len(views):
            try:
                n = sock.sendmsg(views[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            i = advance(views, i, n)

    async def recv_into(self, view) -> int:
        return await self.loop.sock_recv_into(self.sock, view)

    # -- for a thread that polls the socket itself (the fault channel's) --
    def send_parts_blocking(self, buffers, timeout: float, stop_fd: int | None = None) -> None:
        send_blocking(self.sock, buffers, timeout, stop_fd)

    def recv_nowait(self, view) -> int | None:
        """What has arrived, into ``view``: None if nothing yet, 0 at the end."""
        try:
            return self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return None

    def buffered(self) -> bool:
        """Bytes read but not returned yet (the socket's poll will not say)."""
        return False


class TlsIO(_Sends):
    def __init__(self, loop, sock, ctx: ssl.SSLContext, server_side: bool):
        self.loop, self.sock = loop, sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)

    async def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            await self._send_view(memoryview(pending))

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, RECORD_READ)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise TransportError("peer closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:
                await self._flush_quietly()
                raise AuthError(f"TLS handshake failed: {exc.reason or exc}") from None

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except OSError:
            pass

    async def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            n = self._obj.write(view)
            view = view[n:]
            await self._flush()

    async def send_parts(self, buffers) -> None:
        """All of ``buffers``, in order: encrypted into the outgoing buffer
        and sent a MiB or so at a time, not one send per part."""
        for b in buffers:
            view = memoryview(b)
            while view:
                n = self._obj.write(view)
                view = view[n:]
                if self._out.pending >= 1 << 20:
                    await self._flush()
        await self._flush()

    async def recv_into(self, view) -> int:
        while True:
            try:
                return self._obj.read(len(view), view)
            except ssl.SSLWantReadError:
                if not await self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLError as exc:
                raise _read_error(exc) from None

    # -- for a thread that polls the socket itself (the fault channel's) --
    def send_parts_blocking(self, buffers, timeout: float, stop_fd: int | None = None) -> None:
        for b in buffers:
            view = memoryview(b)
            while view:
                view = view[self._obj.write(view) :]
        send_blocking(self.sock, [self._out.read()], timeout, stop_fd)

    def recv_nowait(self, view) -> int | None:
        """Decrypted bytes into ``view``: None if no whole record is here yet, 0 at the end."""
        while True:
            try:
                return self._obj.read(len(view), view)
            except ssl.SSLWantReadError:
                try:
                    data = self.sock.recv(RECORD_READ)
                except (BlockingIOError, InterruptedError):
                    return None
                if not data:
                    return 0  # the peer closed (with or without close_notify): the caller names where
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLError as exc:
                raise _read_error(exc) from None

    def buffered(self) -> bool:
        """Records read from the socket but not decrypted and returned yet:
        the socket's poll will not say."""
        return bool(self._obj.pending() or self._in.pending)


def _read_error(exc: ssl.SSLError) -> Exception:
    reason = exc.reason or str(exc)
    if "ALERT" in reason:
        return AuthError(f"the peer refused our TLS certificate ({reason})")
    return TransportError(f"TLS error: {reason}")
