"""One explicit state machine per side, and the sans-I/O connection that
drives it.  Every state change goes through ``_move`` and is logged
(old -> new).  Frames that the table does not allow in the current state are
protocol errors.  ERROR and ABORT are legal in every live state.

Source::

    IDLE --send HELLO--> HANDSHAKE --recv WELCOME--> AUTHENTICATING --send AUTH--> PRECOPY
    PRECOPY --send PAGES/PASS_END/POSTCOPY, recv APPLIED--> PRECOPY --pause--> STOP_COPY
    STOP_COPY --send PAGES/PASS_END/STATE--> STOP_COPY --send COMPLETE--> COMPLETING
    COMPLETING --recv CONFIRM--> VALIDATING (--send INSPECT / recv INSPECTION-->)
    VALIDATING --send GO--> SWITCHING --recv RESUMED--> DONE

Destination::

    WAIT_HELLO --recv HELLO--> NEGOTIATING --send WELCOME--> AUTHENTICATING --recv AUTH--> RECEIVING
    RECEIVING --recv PAGES/PASS_END/POSTCOPY, send APPLIED--> RECEIVING --recv STATE--> STATE_LOADED
    STATE_LOADED --recv COMPLETE--> VERIFYING --send CONFIRM--> AWAIT_GO
    AWAIT_GO (--recv INSPECT / send INSPECTION-->) --recv GO--> RESUMING
    RESUMING --send RESUMED--> RUNNING

Any live state --send/recv ERROR--> FAILED, --send/recv ABORT--> ABORTED.

Extra data connections (``--channels`` > 1): the source sends JOIN, the
destination answers WELCOME, then only PAGES and PASS_END flow.  The
postcopy fault channel joins the same way and then carries the
destination's REQUESTs one way and the requested pages (POSTCOPY tables and
PAGES) the other.

Recovery connections (the control connection broke after CONFIRM): the
source, or ``mte-migrate resolve``, sends RECOVER "go" or "abort"; the
destination challenges it with a fresh nonce (WELCOME), the source proves
the decision over that nonce (AUTH); for "go" the destination then resumes
the guest (if it does not run already) and answers RESUMED.  After the
postcopy switch the decision is "postcopy" (the link broke): the
destination then lists the pages it still lacks (POSTCOPY without a table),
sends its switch CONFIRM again, and postcopy goes on on that connection,
with a new fault channel for the requests.  On the destination every connection after the control one starts
in DATA_DEST_TABLE, which takes JOIN, RECOVER, or another source's HELLO
(answered "busy").

The tables below are data; ``python -m migrate.protocol.describe`` draws the
state tables and diagrams of docs/PROTOCOL.md from them.
"""

import enum
import hashlib
import logging

from migrate.errors import PeerError, ProtocolError, TamperedFrame
from migrate.protocol import auth
from migrate.protocol import frames as fr

log = logging.getLogger("migrate.protocol.machine")
T = fr.FrameType


class SourceState(enum.Enum):
    """States of the source's machines (control, data and recovery)."""

    IDLE = "idle"
    HANDSHAKE = "handshake"
    AUTHENTICATING = "authenticating"
    PRECOPY = "precopy"
    STOP_COPY = "stop-and-copy"
    POSTCOPY = "postcopy"
    COMPLETING = "completing"
    VALIDATING = "validating"
    SWITCHING = "switching"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


class DestState(enum.Enum):
    """States of the destination's machines (control and later connections)."""

    WAIT_HELLO = "wait-hello"
    NEGOTIATING = "negotiating"
    CHALLENGING = "challenging"
    AUTHENTICATING = "authenticating"
    RECEIVING = "receiving"
    STATE_LOADED = "state-loaded"
    POSTCOPY = "postcopy"
    VERIFYING = "verifying"
    AWAIT_GO = "await-go"
    RESUMING = "resuming"
    RUNNING = "running"
    FAILED = "failed"
    ABORTED = "aborted"


S, D = SourceState, DestState
SEND, RECV, LOCAL = "send", "recv", "local"

SOURCE_TABLE = {
    (S.IDLE, SEND, T.HELLO): S.HANDSHAKE,
    (S.HANDSHAKE, RECV, T.WELCOME): S.AUTHENTICATING,
    (S.AUTHENTICATING, SEND, T.AUTH): S.PRECOPY,
    (S.PRECOPY, SEND, T.PAGES): S.PRECOPY,
    (S.PRECOPY, SEND, T.PASS_END): S.PRECOPY,
    (S.PRECOPY, RECV, T.APPLIED): S.PRECOPY,
    (S.PRECOPY, SEND, T.POSTCOPY): S.PRECOPY,  # --postcopy: discard ahead, the guest still running here
    (S.PRECOPY, LOCAL, "pause"): S.STOP_COPY,
    (S.STOP_COPY, RECV, T.APPLIED): S.STOP_COPY,  # one the source stopped waiting for
    (S.COMPLETING, RECV, T.APPLIED): S.COMPLETING,
    (S.STOP_COPY, SEND, T.PAGES): S.STOP_COPY,
    (S.STOP_COPY, SEND, T.PASS_END): S.STOP_COPY,
    (S.STOP_COPY, SEND, T.STATE): S.STOP_COPY,
    (S.STOP_COPY, SEND, T.COMPLETE): S.COMPLETING,
    (S.COMPLETING, RECV, T.CONFIRM): S.VALIDATING,
    (S.VALIDATING, SEND, T.INSPECT): S.VALIDATING,
    (S.VALIDATING, RECV, T.INSPECTION): S.VALIDATING,
    (S.VALIDATING, SEND, T.GO): S.SWITCHING,
    (S.SWITCHING, RECV, T.RESUMED): S.DONE,
    # --postcopy: the guest moves at POSTCOPY, the pages it lacks follow
    (S.STOP_COPY, SEND, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, RECV, T.CONFIRM): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.PAGES): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.PASS_END): S.SWITCHING,
    (S.SWITCHING, RECV, T.CONFIRM): S.SWITCHING,  # every page sent before the switch's CONFIRM came
}

DEST_TABLE = {
    (D.WAIT_HELLO, RECV, T.HELLO): D.NEGOTIATING,
    (D.NEGOTIATING, SEND, T.WELCOME): D.AUTHENTICATING,
    (D.AUTHENTICATING, RECV, T.AUTH): D.RECEIVING,
    (D.RECEIVING, RECV, T.PAGES): D.RECEIVING,
    (D.RECEIVING, RECV, T.PASS_END): D.RECEIVING,
    (D.RECEIVING, SEND, T.APPLIED): D.RECEIVING,
    (D.RECEIVING, RECV, T.POSTCOPY): D.RECEIVING,  # --postcopy: discard ahead (APPLIED says done)
    (D.RECEIVING, RECV, T.STATE): D.STATE_LOADED,
    (D.STATE_LOADED, RECV, T.COMPLETE): D.VERIFYING,
    (D.VERIFYING, SEND, T.CONFIRM): D.AWAIT_GO,
    (D.AWAIT_GO, RECV, T.INSPECT): D.AWAIT_GO,
    (D.AWAIT_GO, SEND, T.INSPECTION): D.AWAIT_GO,
    (D.AWAIT_GO, RECV, T.GO): D.RESUMING,
    (D.RESUMING, SEND, T.RESUMED): D.RUNNING,
    # --postcopy: resume at POSTCOPY, fetch the missing pages, RESUMED once all are here
    (D.STATE_LOADED, RECV, T.POSTCOPY): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.POSTCOPY): D.POSTCOPY,
    (D.POSTCOPY, SEND, T.CONFIRM): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.PAGES): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.PASS_END): D.RESUMING,
}


# Extra data connections (--channels N > 1) carry only pages.  The fault
# channel (JOIN for the channel after the last data channel, opened just
# before a postcopy switch) turns to postcopy ("faults") at once: the
# destination's REQUESTs and the pages they ask for, each with its table,
# travel there and never wait behind the background stream.
DATA_SOURCE_TABLE = {
    (S.IDLE, SEND, T.JOIN): S.HANDSHAKE,
    (S.HANDSHAKE, RECV, T.WELCOME): S.PRECOPY,
    (S.PRECOPY, SEND, T.PAGES): S.PRECOPY,
    (S.PRECOPY, SEND, T.PASS_END): S.PRECOPY,
    (S.PRECOPY, LOCAL, "faults"): S.POSTCOPY,
    (S.POSTCOPY, RECV, T.REQUEST): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.PAGES): S.POSTCOPY,
}

DATA_DEST_TABLE = {
    # the in-doubt window: RECOVER, our challenge, its proof (see RECOVERY below)
    (D.WAIT_HELLO, RECV, T.RECOVER): D.CHALLENGING,
    (D.CHALLENGING, SEND, T.WELCOME): D.AUTHENTICATING,
    (D.AUTHENTICATING, RECV, T.AUTH): D.RESUMING,
    (D.RESUMING, SEND, T.RESUMED): D.RUNNING,
    (D.WAIT_HELLO, RECV, T.JOIN): D.NEGOTIATING,
    (D.WAIT_HELLO, RECV, T.HELLO): D.NEGOTIATING,  # another source: answered "busy"
    (D.NEGOTIATING, SEND, T.WELCOME): D.RECEIVING,
    (D.RECEIVING, RECV, T.PAGES): D.RECEIVING,
    (D.RECEIVING, RECV, T.PASS_END): D.RECEIVING,
    # the fault channel, from the postcopy switch on (see DATA_SOURCE_TABLE)
    (D.RECEIVING, LOCAL, "faults"): D.POSTCOPY,
    (D.POSTCOPY, SEND, T.REQUEST): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.POSTCOPY): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.PAGES): D.POSTCOPY,
    # postcopy resumed (RECOVER "postcopy"): the pages still missing here, the
    # switch's CONFIRM again, then the background stream goes on on this
    # connection (and a new fault channel joins)
    (D.RESUMING, SEND, T.POSTCOPY): D.POSTCOPY,
    (D.POSTCOPY, SEND, T.POSTCOPY): D.POSTCOPY,
    (D.POSTCOPY, SEND, T.CONFIRM): D.POSTCOPY,
    (D.POSTCOPY, RECV, T.PASS_END): D.RESUMING,
}


# A recovery connection: after GO the source did not hear RESUMED; it says
# RECOVER "go" (or, after CONFIRM but before GO, "abort"; after a postcopy
# switch, "postcopy"), proves it in AUTH over the nonce of the destination's
# challenge (WELCOME), and for "go" waits for RESUMED.
RECOVERY_SOURCE_TABLE = {
    (S.IDLE, SEND, T.RECOVER): S.HANDSHAKE,
    (S.HANDSHAKE, RECV, T.WELCOME): S.AUTHENTICATING,
    (S.AUTHENTICATING, SEND, T.AUTH): S.SWITCHING,
    (S.SWITCHING, RECV, T.RESUMED): S.DONE,
    # RECOVER "postcopy": the destination lists the pages it still lacks
    # (POSTCOPY without a table), then postcopy goes on as on the control connection
    (S.SWITCHING, RECV, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, RECV, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, RECV, T.CONFIRM): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.POSTCOPY): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.PAGES): S.POSTCOPY,
    (S.POSTCOPY, SEND, T.PASS_END): S.SWITCHING,
    (S.SWITCHING, RECV, T.CONFIRM): S.SWITCHING,
}


class StateMachine:
    """One side of one connection: ``table`` maps (state, direction, frame
    type or local event) to the next state; ERROR and ABORT lead from any
    state outside ``terminal`` to ``failed`` / ``aborted``."""

    def __init__(self, side: str, initial, table: dict, failed, aborted, terminal: set):
        self.side = side
        self.state = initial
        self.table = table
        self.failed = failed
        self.aborted = aborted
        self.terminal = terminal | {failed, aborted}
        self.history = [initial]
        self.peer_said = None  # the peer's ERROR or ABORT frame, once received

    def _move(self, new, why: str) -> None:
        log.debug("%s: %s -> %s (%s)", self.side, self.state.value, new.value, why)
        self.state = new
        self.history.append(new)

    def step(self, direction: str, what) -> None:
        if what in (T.ERROR, T.ABORT):
            if self.state not in self.terminal:
                self._move(self.failed if what == T.ERROR else self.aborted, f"{direction} {what.name}")
            return
        new = self.table.get((self.state, direction, what))
        name = what.name if isinstance(what, T) else what
        if new is None:
            said = self.peer_said
            if said is not None and direction != RECV:
                # The peer already ended this connection (a receive pending
                # elsewhere read it): its words, not "cannot X in state failed".
                peer = "destination" if self.side.startswith("source") else "source"
                message = getattr(said, "message", None) or said.reason
                raise PeerError(f"{peer}: {message}", getattr(said, "code", "abort"))
            if direction == RECV:
                raise ProtocolError(f"unexpected {name} frame while the {self.side} is in state {self.state.value}")
            raise RuntimeError(f"{self.side} cannot {direction} {name} in state {self.state.value}")
        self._move(new, f"{direction} {name}")

    def local(self, event: str) -> None:
        self.step(LOCAL, event)

    def fail(self, why: str) -> None:
        if self.state not in self.terminal:
            self._move(self.failed, why)

    @property
    def finished(self) -> bool:
        return self.state in self.terminal


def source_machine() -> StateMachine:
    return StateMachine("source", S.IDLE, SOURCE_TABLE, S.FAILED, S.ABORTED, {S.DONE})


def dest_machine() -> StateMachine:
    return StateMachine("destination", D.WAIT_HELLO, DEST_TABLE, D.FAILED, D.ABORTED, {D.RUNNING})


def data_source_machine(channel: int) -> StateMachine:
    return StateMachine(f"source channel {channel}", S.IDLE, DATA_SOURCE_TABLE, S.FAILED, S.ABORTED, set())


def recovery_source_machine() -> StateMachine:
    return StateMachine("source recovery", S.IDLE, RECOVERY_SOURCE_TABLE, S.FAILED, S.ABORTED, {S.DONE})


def data_dest_machine() -> StateMachine:
    return StateMachine("destination data channel", D.WAIT_HELLO, DATA_DEST_TABLE, D.FAILED, D.ABORTED, {D.RUNNING})


class Connection:
    """Sans-I/O protocol endpoint: frames in and out through the state machine.

    ``send(frame)`` checks the transition and returns the buffers to write;
    ``receive(header, meta, payload, trailer)`` authenticates (once sealed),
    decodes, checks the transition and the page bounds, and returns the
    frame.  ``feed(bytes)`` does both halves of receiving for callers that
    hold whole byte strings (tests, joins).

    ``keyed``: the side has a shared key; the connection then keeps a digest
    of every frame until ``seal`` turns the MACs on (see auth)."""

    def __init__(self, machine: StateMachine, checksum="full", keyed: bool = False):
        self.machine = machine
        self.checksum = checksum = fr.checksum_mode(checksum)
        self.ram_pages: int | None = None
        self._buffer = fr.FrameBuffer(require_crc=checksum)
        self._transcript = hashlib.sha256() if keyed else None
        self._mac_out: auth.FrameMac | None = None
        self._mac_in: auth.FrameMac | None = None
        #: once sealed: this connection's secret (data channels derive theirs from it)
        self.stream_secret: bytes | None = None

    @property
    def state(self):
        return self.machine.state

    @property
    def sealed(self) -> bool:
        return self._mac_in is not None

    @property
    def authenticated_frames(self) -> int:
        """Frames received whose MAC checked out."""
        return self._mac_in.seq if self._mac_in is not None else 0

    def seal(self, secret: bytes, side: str) -> bytes:
        """From the next frame on, every frame each way carries a MAC under
        keys bound to ``secret`` and to every byte exchanged so far; returns
        the connection's stream secret."""
        if self._transcript is None:
            raise RuntimeError("only a keyed connection can be sealed")
        self.stream_secret = auth.stream_secret(secret, self._transcript.digest())
        out, into = auth.direction_keys(self.stream_secret, side)
        self._mac_out, self._mac_in = auth.FrameMac(out), auth.FrameMac(into)
        self._transcript = None
        return self.stream_secret

    def send(self, frame) -> list:
        self.machine.step(SEND, frame.type)
        buffers = fr.encode(frame, self.checksum, self._mac_out)
        if self._transcript is not None:
            for b in buffers:
                self._transcript.update(b)
        return buffers

    def parse_header(self, raw) -> fr.Header:
        if self.machine.finished:
            raise ProtocolError(f"{self.machine.side} received data after the migration ended")
        return self._check_mac_flag(fr.parse_header(raw, self.checksum))

    def _check_mac_flag(self, header: fr.Header) -> fr.Header:
        """Refused at the header, before its meta or payload is read: a frame
        without a MAC on a sealed connection, or with one before the seal
        (nothing could check it)."""
        has_mac = bool(header.flags & fr.FLAG_MAC)
        if self._mac_in is not None and not has_mac and not self._refusal(header):
            raise TamperedFrame(
                f"{header.type.name} frame carries no MAC on a connection sealed with the shared key: "
                f"the stream was altered in transit"
            )
        if self._mac_in is None and has_mac:
            raise ProtocolError(
                f"{header.type.name} frame carries a MAC where this side expects none "
                f"(give both sides the same --psk-file)"
            )
        return header

    def _refusal(self, header: fr.Header) -> bool:
        """An ERROR without a MAC as the very first frame after the seal: a
        peer that refused our proof never sealed, and says why.  It can only
        end the migration, as anyone on the path can by cutting the link."""
        return header.type == T.ERROR and not header.flags & fr.FLAG_MAC and self._mac_in.seq == 0

    def receive(self, header: fr.Header, meta, payload, trailer=b""):
        self._authenticate(header, meta, payload, trailer)
        frame = fr.decode(header, meta, payload, self.checksum)
        return self._accept(frame)

    def _authenticate(self, header: fr.Header, meta, payload, trailer) -> None:
        """Check the MAC of a sealed connection's frame before its meta is
        even unpacked; before the seal, add the frame to the transcript."""
        mac = self._mac_in
        if mac is not None and not self._refusal(header):
            seq = mac.seq
            if not header.flags & fr.FLAG_MAC or not mac.check(header.raw, meta, payload, trailer):
                why = "the peer does not hold the shared key, or " if seq == 0 else ""
                raise TamperedFrame(
                    f"{header.type.name} frame #{seq} after the handshake failed its authentication (MAC): "
                    f"{why}it was altered, replayed or reordered in transit"
                )
        elif self._transcript is not None:
            for b in (header.raw, meta, payload, trailer):
                self._transcript.update(b)

    def receive_pages_head(self, header: fr.Header, meta):
        """The checked fields of a self-checked PAGES frame whose payload is
        still on the wire (fr.decode_pages_head), and its data length."""
        return fr.decode_pages_head(header, meta, self.checksum)

    def accept_landing(self, fields: dict) -> "fr.Pages":
        """A PAGES frame whose data goes straight into guest RAM: the
        transition and the page bounds are checked before a byte lands; the
        caller fills in the tags (and checks them) afterwards."""
        return self._accept(fr.Pages(data=None, tags=b"", landed=True, **fields))

    def feed(self, data) -> list:
        frames = []
        for header, meta, payload, trailer in self._buffer.units(data):
            self._check_mac_flag(header)
            frames.append(self.receive(header, meta, payload, trailer))
        return frames

    def _accept(self, frame):
        self.machine.step(RECV, frame.type)
        if frame.type in (T.ERROR, T.ABORT) and self.machine.peer_said is None:
            self.machine.peer_said = frame
        if frame.type == T.HELLO:
            self.ram_pages = frame.ram_size // fr.PAGE_SIZE if frame.page_size == fr.PAGE_SIZE else None
        elif frame.type in (T.PAGES, T.POSTCOPY, T.REQUEST):
            self._check_pages(frame)
        return frame

    def _check_pages(self, frame) -> None:
        limit = self.ram_pages
        for first, count in frame.ranges:
            if limit is None or first + count > limit:
                raise ProtocolError(
                    f"PAGES frame names pages {first}..{first + count - 1}, outside guest RAM ({limit} pages)"
                )
