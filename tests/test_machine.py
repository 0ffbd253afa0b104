"""State machines and the sans-I/O Connection (migrate/machine.py): every
transition of both tables, illegal frames in every state, ERROR/ABORT from
every live state, page bounds from HELLO, and a whole migration exchange
between a source and a destination joined in memory."""

import logging

import pytest

from migrate.errors import PeerError, ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol import machine as mach
from migrate.protocol.machine import (
    DEST_TABLE,
    LOCAL,
    RECV,
    SEND,
    SOURCE_TABLE,
    Connection,
    DestState,
    SourceState,
    dest_machine,
    source_machine,
)

T = fr.FrameType
S, D = SourceState, DestState
PAGE = fr.PAGE_SIZE
RAM = 8 << 20
RAM_PAGES = RAM // PAGE

HELLO = fr.Hello(1, RAM, PAGE, 16, True, 2, "tag-ioctl", "packed4", "auto", "vm-1", nonce=b"\x01" * 32)
WELCOME = fr.Welcome(1, b"\x02" * 32, b"\x03" * 32)
AUTH = fr.Auth(b"\x04" * 32)
EXAMPLE = {
    T.HELLO: HELLO,
    T.WELCOME: WELCOME,
    T.AUTH: AUTH,
    T.PAGES: fr.Pages(1, [(0, 1), (RAM_PAGES - 1, 1)], bytes([0, fr.PAGE_ZERO]), b"\x11" * PAGE),
    T.PASS_END: fr.PassEnd(1, 2),
    T.STATE: fr.State({"vcpus": [], "devices": {}}),
    T.COMPLETE: fr.Complete("d", "t", "s"),
    T.CONFIRM: fr.Confirm("d", "t", "s", b"\0" * 8),
    T.INSPECT: fr.Inspect([0]),
    T.INSPECTION: fr.Inspection([0], b"\1" * 132),
    T.GO: fr.Go(),
    T.RESUMED: fr.Resumed(),
    T.ERROR: fr.Error("protocol", "bad"),
    T.ABORT: fr.Abort("user cancelled"),
}
if hasattr(T, "JOIN"):
    EXAMPLE[T.JOIN] = fr.Join("session-1", 1, b"\x05" * 32)
if hasattr(T, "RECOVER"):  # the in-doubt window, on a new connection
    EXAMPLE[T.RECOVER] = fr.Recover("session-1", "go")
EXAMPLE[T.POSTCOPY] = fr.Postcopy([(1, 1)], b"\x02" * 8)
EXAMPLE[T.REQUEST] = fr.Request([(1, 1)])
EXAMPLE[T.APPLIED] = fr.Applied(0)


def _reachable(table, initial, failed, aborted):
    states = [initial] + [v for v in table.values()] + [k[0] for k in table]
    return list(dict.fromkeys(states + [failed, aborted]))


# side -> (make, states, table, failed, aborted, terminal, name in messages)
SIDES = {
    "source": (source_machine, list(SourceState), SOURCE_TABLE, S.FAILED, S.ABORTED, {S.DONE}, "source"),
    "destination": (
        dest_machine,
        # CHALLENGING belongs to recovery connections only (DATA_DEST_TABLE)
        [s for s in DestState if s.name != "CHALLENGING"],
        DEST_TABLE,
        D.FAILED,
        D.ABORTED,
        {D.RUNNING},
        "destination",
    ),
}
if hasattr(mach, "DATA_SOURCE_TABLE"):  # extra data connections (--channels)
    SIDES["data-source"] = (
        lambda: mach.data_source_machine(1),
        _reachable(mach.DATA_SOURCE_TABLE, S.IDLE, S.FAILED, S.ABORTED),
        mach.DATA_SOURCE_TABLE,
        S.FAILED,
        S.ABORTED,
        set(),
        "source channel 1",
    )
    SIDES["data-destination"] = (
        mach.data_dest_machine,
        _reachable(mach.DATA_DEST_TABLE, D.WAIT_HELLO, D.FAILED, D.ABORTED),
        mach.DATA_DEST_TABLE,
        D.FAILED,
        D.ABORTED,
        {D.RUNNING} if "RECOVER" in fr.FrameType.__members__ else set(),
        "destination data channel",
    )
if hasattr(mach, "RECOVERY_SOURCE_TABLE"):  # the in-doubt window: RECOVER on a new connection
    SIDES["recovery-source"] = (
        mach.recovery_source_machine,
        _reachable(mach.RECOVERY_SOURCE_TABLE, S.IDLE, S.FAILED, S.ABORTED),
        mach.RECOVERY_SOURCE_TABLE,
        S.FAILED,
        S.ABORTED,
        {S.DONE},
        "source recovery",
    )
PAIRS = [("source", "destination")] + ([("data-source", "data-destination")] if "data-source" in SIDES else [])
# Live states a machine may stop in without being terminal: a data channel is
# ended by its main connection, and so is the fault channel, which leaves a
# data channel's states for postcopy's.  (A recovery connection on the data
# listener ends in RUNNING, which is terminal.)
DEAD_ENDS = {"data-source": {S.POSTCOPY}}  # (the destination's POSTCOPY also ends a resumed postcopy: PASS_END)


def wire(frame, checksum=True) -> bytes:
    return b"".join(bytes(b) for b in fr.encode(frame, checksum))


def conn_in(side: str, state, ram_pages=RAM_PAGES) -> Connection:
    conn = Connection(SIDES[side][0]())
    conn.machine.state = state
    conn.ram_pages = ram_pages
    return conn


def _transitions():
    for side in SIDES:
        for (state, direction, what), new in SIDES[side][2].items():
            name = what.name if isinstance(what, T) else what
            yield pytest.param(side, state, direction, what, new, id=f"{side}-{state.value}-{direction}-{name}")


# -- the tables --------------------------------------------------------------------
def test_initial_states():
    assert source_machine().state == S.IDLE
    assert dest_machine().state == D.WAIT_HELLO
    assert source_machine().history == [S.IDLE]


def test_tables_cover_the_documented_protocol():
    # Every non-terminal state has a way forward, and the machines meet:
    # what one side sends in some state the other side receives in some state.
    for side, (make, states, table, failed, aborted, terminal, _) in SIDES.items():
        live = [s for s in states if s not in terminal | {failed, aborted}]
        last = [s for s in live if not any(k[0] == s and v != s for k, v in table.items())]
        # only a data channel may end in a live state (its main connection ends it)
        assert set(last) == DEAD_ENDS.get(side, set()), f"{side} is stuck in {last}"
        assert all(v not in (failed, aborted) for v in table.values())
        assert make().state == states[0]
    for a, b in PAIRS:
        src_table, dst_table = SIDES[a][2], SIDES[b][2]
        if a == "data-source" and "recovery-source" in SIDES:
            # the data listener also serves recovery connections
            src_table = {**src_table, **SIDES["recovery-source"][2]}
        src_sends = {w for (_, d, w) in src_table if d == SEND}
        dst_recvs = {w for (_, d, w) in dst_table if d == RECV}
        dst_sends = {w for (_, d, w) in dst_table if d == SEND}
        src_recvs = {w for (_, d, w) in src_table if d == RECV}
        if a == "source":
            assert src_sends == dst_recvs
        else:
            # a data channel's listener also takes a main HELLO (a second
            # source arriving there is answered "busy"); nothing else extra
            assert src_sends <= dst_recvs and dst_recvs - src_sends <= {T.HELLO}
        assert dst_sends == src_recvs


@pytest.mark.parametrize("side, state, direction, what, new", list(_transitions()))
def test_every_table_transition_through_a_connection(side, state, direction, what, new, caplog):
    conn = conn_in(side, state)
    before = len(conn.machine.history)
    with caplog.at_level(logging.DEBUG, logger="migrate.protocol.machine"):
        if direction == SEND:
            bufs = conn.send(EXAMPLE[what])
            assert fr.FrameBuffer().feed(b"".join(bytes(b) for b in bufs)) == [EXAMPLE[what]]
        elif direction == RECV:
            assert conn.feed(wire(EXAMPLE[what])) == [EXAMPLE[what]]
        else:
            assert direction == LOCAL
            conn.machine.local(what)
    assert conn.state == new
    assert conn.machine.history[before:] == [new]
    # every change is logged old -> new
    assert any(f"{state.value} -> {new.value}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("side, state, direction, what, new", list(_transitions()))
def test_every_table_transition_on_the_bare_machine(side, state, direction, what, new):
    m = SIDES[side][0]()
    m.state = state
    m.step(direction, what)
    assert m.state == new
    assert m.finished == (new in SIDES[side][5])


def _illegal(direction):
    """(side, state, frame type) for every frame the table does not allow in
    ``direction`` (ERROR and ABORT are legal everywhere)."""
    for side, (_, states, table, _failed, _aborted, _terminal, _) in SIDES.items():
        for state in states:
            for ftype in T:
                if ftype in (T.ERROR, T.ABORT) or (state, direction, ftype) in table:
                    continue
                yield pytest.param(side, state, ftype, id=f"{side}-{state.value}-{ftype.name}")


@pytest.mark.parametrize("side, state, ftype", list(_illegal(RECV)))
def test_illegal_frame_in_every_state_is_a_protocol_error(side, state, ftype):
    conn = conn_in(side, state)
    with pytest.raises(ProtocolError) as info:
        conn.feed(wire(EXAMPLE[ftype]))
    msg = str(info.value)
    assert f"unexpected {ftype.name} frame" in msg
    assert f"the {SIDES[side][6]} is in state {state.value}" in msg
    assert conn.state == state  # nothing happened


@pytest.mark.parametrize("side, state, ftype", list(_illegal(SEND)))
def test_illegal_send_is_refused_and_nothing_is_encoded(side, state, ftype):
    conn = conn_in(side, state)
    with pytest.raises(RuntimeError, match=f"{SIDES[side][6]} cannot send {ftype.name} in state {state.value}"):
        conn.send(EXAMPLE[ftype])
    assert conn.state == state


@pytest.mark.parametrize("side", list(SIDES))
def test_pause_is_a_local_event_of_the_source_precopy_only(side):
    make, states, table, *_ = SIDES[side]
    for state in states:
        m = make()
        m.state = state
        if (state, LOCAL, "pause") in table:
            m.local("pause")
            assert m.state == S.STOP_COPY
        else:
            with pytest.raises(RuntimeError, match=f"cannot local pause in state {state.value}"):
                m.local("pause")
            assert m.state == state


def _live_states():
    for side, (_, states, _table, failed, aborted, terminal, _) in SIDES.items():
        for state in states:
            if state not in terminal | {failed, aborted}:
                yield pytest.param(side, state, id=f"{side}-{state.value}")


@pytest.mark.parametrize("direction", [SEND, RECV])
@pytest.mark.parametrize("ftype", [T.ERROR, T.ABORT])
@pytest.mark.parametrize("side, state", list(_live_states()))
def test_error_and_abort_are_legal_in_every_live_state(side, state, ftype, direction):
    _, _, _, failed, aborted, _, _ = SIDES[side]
    conn = conn_in(side, state)
    frame = EXAMPLE[ftype]
    if direction == SEND:
        assert fr.FrameBuffer().feed(b"".join(bytes(b) for b in conn.send(frame))) == [frame]
    else:
        assert conn.feed(wire(frame)) == [frame]
    assert conn.state == (failed if ftype == T.ERROR else aborted)
    assert conn.machine.finished
    assert conn.machine.history[-1] == conn.state


@pytest.mark.parametrize("side", list(SIDES))
def test_terminal_states_stay_put(side):
    make, states, table, failed, aborted, terminal, _ = SIDES[side]
    for state in terminal | {failed, aborted}:
        m = make()
        m.state = state
        assert m.finished
        for ftype in (T.ERROR, T.ABORT):
            m.step(RECV, ftype)
            m.step(SEND, ftype)
            assert m.state == state
        m.fail("late failure")
        assert m.state == state
        # and no ordinary frame is accepted any more
        for ftype in T:
            if ftype not in (T.ERROR, T.ABORT):
                with pytest.raises(ProtocolError, match=f"in state {state.value}"):
                    m.step(RECV, ftype)


@pytest.mark.parametrize("side, state", list(_live_states()))
def test_fail_moves_a_live_machine_to_failed(side, state):
    m = SIDES[side][0]()
    m.state = state
    m.fail("transport broke")
    assert m.state == SIDES[side][3]
    assert m.finished


@pytest.mark.parametrize("side", list(SIDES))
def test_parse_header_after_the_end_is_refused(side):
    make, states, table, failed, aborted, terminal, _ = SIDES[side]
    for state in terminal | {failed, aborted}:
        conn = conn_in(side, state)
        with pytest.raises(ProtocolError, match="received data after the migration ended"):
            conn.parse_header(wire(fr.Go())[: fr.HEADER_SIZE])


# -- page bounds from HELLO ----------------------------------------------------------
def _dest_after_hello(hello=HELLO) -> Connection:
    conn = Connection(dest_machine())
    assert conn.feed(wire(hello)) == [hello]
    assert conn.ram_pages == (hello.ram_size // PAGE if hello.page_size == PAGE else None)
    conn.send(fr.Welcome(1))
    assert conn.state == D.AUTHENTICATING
    assert conn.feed(wire(AUTH)) == [AUTH]
    assert conn.state == D.RECEIVING
    assert conn.ram_pages == (hello.ram_size // PAGE if hello.page_size == PAGE else None)  # AUTH keeps the bound
    return conn


def _pages(ranges):
    n = sum(c for _, c in ranges)
    return fr.Pages(1, ranges, bytes([fr.PAGE_ZERO]) * n)


@pytest.mark.parametrize(
    "ranges", [[(0, 1)], [(RAM_PAGES - 1, 1)], [(0, 1024)], [(RAM_PAGES - 1024, 1024)], [(0, 3), (RAM_PAGES - 2, 2)]]
)
def test_pages_inside_ram_are_accepted(ranges):
    conn = _dest_after_hello()
    assert conn.feed(wire(_pages(ranges))) == [_pages(ranges)]
    assert conn.state == D.RECEIVING


@pytest.mark.parametrize(
    "ranges, shown",
    [
        ([(RAM_PAGES, 1)], f"{RAM_PAGES}..{RAM_PAGES}"),
        ([(RAM_PAGES - 1, 2)], f"{RAM_PAGES - 1}..{RAM_PAGES}"),
        ([(0, 1), (RAM_PAGES + 100, 3)], f"{RAM_PAGES + 100}..{RAM_PAGES + 102}"),
        ([(2**64 - 1, 1)], f"{2**64 - 1}..{2**64 - 1}"),
        ([(2**63, 1024)], None),
    ],
)
def test_pages_outside_ram_are_a_protocol_error(ranges, shown):
    conn = _dest_after_hello()
    with pytest.raises(ProtocolError) as info:
        conn.feed(wire(_pages(ranges)))
    msg = str(info.value)
    assert "outside guest RAM" in msg and f"({RAM_PAGES} pages)" in msg
    if shown:
        assert f"names pages {shown}" in msg


def test_pages_with_a_foreign_page_size_are_refused():
    hello = fr.Hello(1, RAM, 16384, 16, True, 2, "tag-ioctl", "packed4", "auto", "")
    conn = _dest_after_hello(hello)
    assert conn.ram_pages is None
    with pytest.raises(ProtocolError, match="outside guest RAM"):
        conn.feed(wire(_pages([(0, 1)])))


def test_ram_bound_follows_each_hello_size():
    small = fr.Hello(1, 16 * PAGE, PAGE, 16, True, 1, "none", "none", "none", "")
    conn = _dest_after_hello(small)
    assert conn.feed(wire(_pages([(15, 1)])))
    with pytest.raises(ProtocolError, match=r"names pages 16\.\.16, outside guest RAM \(16 pages\)"):
        conn.feed(wire(_pages([(16, 1)])))


# -- out of order, concretely ------------------------------------------------------------
@pytest.mark.parametrize(
    "frames, bad, state",
    [
        ([], fr.Go(), D.WAIT_HELLO),
        ([], EXAMPLE[T.PAGES], D.WAIT_HELLO),
        ([HELLO], EXAMPLE[T.PAGES], D.NEGOTIATING),  # before WELCOME went out
        ([HELLO], AUTH, D.NEGOTIATING),  # a proof before the destination's nonce
        ([HELLO, "welcome"], EXAMPLE[T.PAGES], D.AUTHENTICATING),  # pages before the source proved the key
        ([HELLO, "welcome"], EXAMPLE[T.PASS_END], D.AUTHENTICATING),
        ([HELLO, "welcome"], EXAMPLE[T.STATE], D.AUTHENTICATING),
        ([HELLO, "welcome"], HELLO, D.AUTHENTICATING),  # a second HELLO instead of AUTH
        ([HELLO, "welcome", AUTH], AUTH, D.RECEIVING),  # a second AUTH
        ([HELLO, "welcome", AUTH], HELLO, D.RECEIVING),  # a second HELLO
        ([HELLO, "welcome", AUTH], fr.Go(), D.RECEIVING),  # GO without COMPLETE/CONFIRM
        ([HELLO, "welcome", AUTH], EXAMPLE[T.COMPLETE], D.RECEIVING),  # COMPLETE before STATE
        ([HELLO, "welcome", AUTH, EXAMPLE[T.STATE]], EXAMPLE[T.STATE], D.STATE_LOADED),
        ([HELLO, "welcome", AUTH, EXAMPLE[T.STATE]], EXAMPLE[T.PAGES], D.STATE_LOADED),
        ([HELLO, "welcome", AUTH, EXAMPLE[T.STATE], EXAMPLE[T.COMPLETE]], fr.Go(), D.VERIFYING),  # before CONFIRM
    ],
)
def test_destination_refuses_frames_out_of_order(frames, bad, state):
    conn = Connection(dest_machine())
    for f in frames:
        if f == "welcome":
            conn.send(fr.Welcome(1))
        else:
            conn.feed(wire(f))
    assert conn.state == state
    with pytest.raises(
        ProtocolError, match=f"unexpected {bad.type.name} frame while the destination is in state {state.value}"
    ):
        conn.feed(wire(bad))


def test_frames_after_a_bad_one_in_the_same_feed_are_not_accepted():
    conn = Connection(dest_machine())
    with pytest.raises(ProtocolError, match="unexpected GO"):
        conn.feed(wire(fr.Go()) + wire(HELLO))
    assert conn.state == D.WAIT_HELLO


# -- a whole migration, joined in memory -------------------------------------------
class Join:
    """A source and a destination Connection joined by byte strings."""

    def __init__(self, checksum=True):
        self.src = Connection(source_machine(), checksum)
        self.dst = Connection(dest_machine(), checksum)
        self.to_dst = bytearray()
        self.to_src = bytearray()

    def s(self, frame):
        self.to_dst += b"".join(bytes(b) for b in self.src.send(frame))

    def d(self, frame):
        self.to_src += b"".join(bytes(b) for b in self.dst.send(frame))

    def deliver_to_dst(self, step=None):
        data, self.to_dst = bytes(self.to_dst), bytearray()
        return _deliver(self.dst, data, step)

    def deliver_to_src(self, step=None):
        data, self.to_src = bytes(self.to_src), bytearray()
        return _deliver(self.src, data, step)


def _deliver(conn, data, step):
    if step is None:
        return conn.feed(data)
    out = []
    for i in range(0, len(data), step):
        out += conn.feed(data[i : i + step])
    return out


def _data_pages(first, count, byte):
    return fr.Pages(1, [(first, count)], bytes(count), bytes([byte]) * (count * PAGE))


@pytest.mark.parametrize("step", [None, 1, 7, 4096])
@pytest.mark.parametrize("checksum", [True, False])
def test_happy_path_hello_to_resumed(step, checksum):
    j = Join(checksum)
    # handshake
    j.s(HELLO)
    assert j.src.state == S.HANDSHAKE
    assert j.deliver_to_dst(step) == [HELLO]
    assert j.dst.state == D.NEGOTIATING and j.dst.ram_pages == RAM_PAGES
    j.d(WELCOME)
    assert j.deliver_to_src(step) == [WELCOME]
    assert (j.src.state, j.dst.state) == (S.AUTHENTICATING, D.AUTHENTICATING)
    # the source proves the key before any page moves
    j.s(AUTH)
    assert j.src.state == S.PRECOPY
    assert j.deliver_to_dst(step) == [AUTH]
    assert (j.src.state, j.dst.state) == (S.PRECOPY, D.RECEIVING)
    # precopy: a bulk pass and a dirty pass
    sent = [_data_pages(0, 4, 1), _pages([(4, 100)]), fr.PassEnd(0, 104), _data_pages(2, 1, 2), fr.PassEnd(1, 1)]
    for f in sent:
        j.s(f)
    assert j.deliver_to_dst(step) == sent
    assert (j.src.state, j.dst.state) == (S.PRECOPY, D.RECEIVING)
    # stop and copy
    j.src.machine.local("pause")
    final = [_data_pages(3, 1, 3), fr.PassEnd(2, 1), EXAMPLE[T.STATE], EXAMPLE[T.COMPLETE]]
    for f in final:
        j.s(f)
    assert j.src.state == S.COMPLETING
    assert j.deliver_to_dst(step) == final
    assert j.dst.state == D.VERIFYING
    # completion, with one inspection round
    j.d(EXAMPLE[T.CONFIRM])
    assert j.dst.state == D.AWAIT_GO
    assert j.deliver_to_src(step) == [EXAMPLE[T.CONFIRM]]
    assert j.src.state == S.VALIDATING
    j.s(fr.Inspect([0, 1]))
    assert j.deliver_to_dst(step) == [fr.Inspect([0, 1])]
    j.d(fr.Inspection([0, 1], b"\2" * 264))
    assert j.deliver_to_src(step) == [fr.Inspection([0, 1], b"\2" * 264)]
    assert (j.src.state, j.dst.state) == (S.VALIDATING, D.AWAIT_GO)
    # switchover
    j.s(fr.Go())
    assert j.src.state == S.SWITCHING
    assert j.deliver_to_dst(step) == [fr.Go()]
    assert j.dst.state == D.RESUMING
    j.d(fr.Resumed())
    assert j.deliver_to_src(step) == [fr.Resumed()]
    assert (j.src.state, j.dst.state) == (S.DONE, D.RUNNING)
    assert j.src.machine.finished and j.dst.machine.finished
    assert j.src.machine.history == [S.IDLE, S.HANDSHAKE, S.AUTHENTICATING, S.PRECOPY] + [S.PRECOPY] * 5 + [
        S.STOP_COPY
    ] * 4 + [S.COMPLETING, S.VALIDATING, S.VALIDATING, S.VALIDATING, S.SWITCHING, S.DONE]
    assert j.dst.machine.history == [D.WAIT_HELLO, D.NEGOTIATING, D.AUTHENTICATING, D.RECEIVING] + [D.RECEIVING] * 7 + [
        D.STATE_LOADED,
        D.VERIFYING,
        D.AWAIT_GO,
        D.AWAIT_GO,
        D.AWAIT_GO,
        D.RESUMING,
        D.RUNNING,
    ]
    for conn in (j.src, j.dst):
        assert conn._buffer.pending == 0


def test_joined_abort_mid_precopy_reaches_both_sides():
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    j.d(fr.Welcome(1))
    j.deliver_to_src()
    j.s(AUTH)
    j.s(_data_pages(0, 1, 9))
    j.s(fr.Abort("user pressed Ctrl-C"))
    assert j.src.state == S.ABORTED
    got = j.deliver_to_dst()
    assert got[0] == AUTH and got[-1] == fr.Abort("user pressed Ctrl-C")
    assert j.dst.state == D.ABORTED
    # The destination takes no more pages after that.
    with pytest.raises(ProtocolError, match="unexpected PAGES frame while the destination is in state aborted"):
        j.dst.feed(wire(_data_pages(1, 1, 9)))


def test_joined_destination_error_fails_the_source():
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    mismatch = fr.Error("mismatch", "RAM size differs: source 8 MiB, destination 16 MiB")
    j.d(mismatch)
    assert j.dst.state == D.FAILED
    assert j.deliver_to_src() == [mismatch]
    assert j.src.state == S.FAILED


def test_joined_source_refuses_the_destination_proof():
    # The source checks WELCOME's proof before it sends AUTH: a wrong one is
    # answered with ERROR from AUTHENTICATING, and no page can follow.
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    j.d(WELCOME)
    assert j.deliver_to_src() == [WELCOME]
    assert (j.src.state, j.dst.state) == (S.AUTHENTICATING, D.AUTHENTICATING)
    refusal = fr.Error("auth", "the destination failed authentication: its shared key differs")
    j.s(refusal)
    assert j.src.state == S.FAILED
    assert j.deliver_to_dst() == [refusal]
    assert j.dst.state == D.FAILED
    assert j.src.machine.history == [S.IDLE, S.HANDSHAKE, S.AUTHENTICATING, S.FAILED]
    assert j.dst.machine.history == [D.WAIT_HELLO, D.NEGOTIATING, D.AUTHENTICATING, D.FAILED]
    with pytest.raises(ProtocolError, match="unexpected PAGES frame while the destination is in state failed"):
        j.dst.feed(wire(_data_pages(0, 1, 9)))


def test_joined_destination_refuses_the_source_proof():
    # The destination reads AUTH, finds the proof wrong and answers ERROR;
    # the source (already past AUTH) fails on it.
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    j.d(WELCOME)
    j.deliver_to_src()
    j.s(AUTH)
    assert j.deliver_to_dst() == [AUTH]
    refusal = fr.Error("auth", "authentication failed: the source did not prove the shared key")
    j.d(refusal)
    assert j.dst.state == D.FAILED
    assert j.deliver_to_src() == [refusal]
    assert j.src.state == S.FAILED
    with pytest.raises(PeerError, match="destination: authentication failed: the source did not prove the shared key"):
        j.s(_data_pages(0, 1, 9))


def test_joined_pages_before_auth_are_refused():
    # A source that skips AUTH: its first page is a protocol error and the
    # destination stays where it was (nothing is applied).
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    j.d(WELCOME)
    j.deliver_to_src()
    with pytest.raises(RuntimeError, match="source cannot send PAGES in state authenticating"):
        j.s(_data_pages(0, 1, 9))
    with pytest.raises(ProtocolError, match="unexpected PAGES frame while the destination is in state authenticating"):
        j.dst.feed(wire(_data_pages(0, 1, 9)))
    assert j.dst.state == D.AUTHENTICATING


def test_joined_corruption_is_caught_at_the_frame():
    j = Join()
    j.s(HELLO)
    j.deliver_to_dst()
    j.d(fr.Welcome(1))
    j.deliver_to_src()
    j.s(AUTH)
    assert j.deliver_to_dst() == [AUTH]
    j.s(_data_pages(0, 2, 5))
    j.to_dst[fr.HEADER_SIZE + 100] ^= 0x10
    with pytest.raises(ProtocolError, match="PAGES frame failed its checksum"):
        j.deliver_to_dst()
    assert j.dst.state == D.RECEIVING  # the caller decides to fail; nothing was applied


def test_data_channel_join_then_pages_only():
    src, dst = SIDES["data-source"][0](), SIDES["data-destination"][0]()
    src, dst = Connection(src), Connection(dst)
    join = fr.Join("session-1", 1, b"\x05" * 32)
    assert dst.feed(b"".join(bytes(b) for b in src.send(join))) == [join]
    assert dst.ram_pages is None  # a data channel learns the RAM size from its main connection
    dst.ram_pages = RAM_PAGES
    assert src.feed(b"".join(bytes(b) for b in dst.send(fr.Welcome(1)))) == [fr.Welcome(1)]
    assert (src.state, dst.state) == (S.PRECOPY, D.RECEIVING)
    frames = [_data_pages(0, 2, 1), fr.PassEnd(0, 2)]
    assert dst.feed(b"".join(bytes(b) for f in frames for b in src.send(f))) == frames
    # nothing but pages on a data channel
    for f in (HELLO, AUTH, EXAMPLE[T.STATE], EXAMPLE[T.COMPLETE], fr.Go()):
        with pytest.raises(ProtocolError, match=f"unexpected {f.type.name} frame while the destination data channel"):
            dst.feed(wire(f))
    with pytest.raises(RuntimeError, match="source channel 1 cannot local pause"):
        src.machine.local("pause")
    with pytest.raises(ProtocolError, match="outside guest RAM"):
        dst.feed(wire(_pages([(RAM_PAGES, 1)])))
    # the main connection still takes no JOIN
    with pytest.raises(ProtocolError, match="unexpected JOIN frame while the destination is in state wait-hello"):
        Connection(dest_machine()).feed(wire(join))
