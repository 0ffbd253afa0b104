"""migrate.tools.qemu_peer: the QMP client against a fake QMP server on a UNIX
socket, the errors when QEMU is missing or too old, the side-by-side table's
arithmetic (speed.vs_qemu_entry), and one real QEMU migration of a 64 MiB
guest when QEMU 10 is installed."""

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from migrate import cli
from migrate.errors import ConfigError
from migrate.hosting.images import make_image
from migrate.tools import qemu_peer
from migrate.tools.qemu_peer import (
    QemuError,
    QemuUnavailable,
    Qmp,
    QmpError,
    cpu_seconds,
    find_qemu,
    loader_pieces,
    parse_version,
    wait_status,
)
from migrate.tools.speed import vs_qemu_entry, vs_qemu_markdown

MiB = 1 << 20
GREETING = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": []}}


class FakeQmp:
    """A QMP server in a thread: sends ``greeting``, then answers each command
    from ``answers[command]`` (a list, used in turn; the last one repeats).
    An answer is a list of messages sent in order; None sends nothing."""

    def __init__(self, answers: dict, greeting=GREETING, close_after=None):
        self.dir = tempfile.mkdtemp(prefix="fakeqmp-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.answers = {k: list(v) for k, v in answers.items()}
        self.greeting = greeting
        self.close_after = close_after
        self.received = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):  # tests that hang up early
            f = conn.makefile("rwb")
            f.write(json.dumps(self.greeting).encode() + b"\r\n")
            f.flush()
            for line in f:
                msg = json.loads(line)
                self.received.append(msg)
                if self.close_after == msg["execute"]:
                    return
                cmd = msg["execute"]
                if cmd == "qmp_capabilities" and cmd not in self.answers:
                    replies = [{"return": {}}]
                else:
                    queue = self.answers[cmd]
                    replies = queue.pop(0) if len(queue) > 1 else queue[0]
                for r in replies or []:
                    if "return" in r or "error" in r:
                        r = {**r, "id": msg["id"]}
                    f.write(json.dumps(r).encode() + b"\r\n")
                f.flush()

    def close(self):
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def fake():
    made = []

    def make(*args, **kw):
        made.append(FakeQmp(*args, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def deadline(s=5.0):
    return time.monotonic() + s


def test_greeting_and_capabilities_come_first(fake):
    server = fake({"query-version": [[{"return": {"qemu": {"major": 10}}}]]})
    q = Qmp(server.path, deadline())
    try:
        assert q.version == "10.0.2" and q.package == "fake"
        assert q.execute("query-version") == {"qemu": {"major": 10}}
    finally:
        q.close()
    assert [m["execute"] for m in server.received] == ["qmp_capabilities", "query-version"]
    assert "arguments" not in server.received[1]


def test_arguments_are_sent_and_events_set_aside(fake):
    event = {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 0, "microseconds": 0}}
    server = fake({"migrate": [[event, {"return": {}}]]})
    q = Qmp(server.path, deadline())
    try:
        assert q.execute("migrate", {"uri": "tcp:127.0.0.1:1"}) == {}
        assert q.events == [event]
    finally:
        q.close()
    assert server.received[-1]["arguments"] == {"uri": "tcp:127.0.0.1:1"}


def test_an_error_answer_raises_with_its_class_and_description(fake):
    server = fake({"migrate": [[{"error": {"class": "GenericError", "desc": "Failed to connect"}}]]})
    q = Qmp(server.path, deadline())
    try:
        with pytest.raises(QmpError, match="QMP migrate: GenericError: Failed to connect") as caught:
            q.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert caught.value.error_class == "GenericError" and isinstance(caught.value, QemuError)
    finally:
        q.close()


def test_a_refused_capabilities_negotiation_fails_the_connection(fake):
    server = fake({"qmp_capabilities": [[{"error": {"class": "CommandNotFound", "desc": "no"}}]]})
    with pytest.raises(QmpError, match="qmp_capabilities"):
        Qmp(server.path, deadline())


def test_wait_status_polls_through_a_status_sequence(fake):
    seq = [
        [{"return": {"status": "setup"}}],
        [{"return": {"status": "active", "ram": {"transferred": 1}}}],
        [{"return": {"status": "active", "ram": {"transferred": 2}}}],
        [{"return": {"status": "completed", "total-time": 42, "downtime": 3}}],
    ]
    server = fake({"query-migrate": seq})
    q = Qmp(server.path, deadline())
    try:
        info = wait_status(q, deadline(), poll_s=0.001)
    finally:
        q.close()
    assert info == {"status": "completed", "total-time": 42, "downtime": 3}
    assert [m["execute"] for m in server.received].count("query-migrate") == 4


def test_wait_status_gives_up_at_the_deadline(fake):
    server = fake({"query-migrate": [[{"return": {"status": "active"}}]]})
    q = Qmp(server.path, deadline())
    try:
        t0 = time.monotonic()
        # Which words depend on where the deadline falls: between polls, or
        # inside one (a loaded machine answers slowly); either way it gives up.
        with pytest.raises(QemuError, match="still 'active' at the deadline|no answer in time"):
            wait_status(q, time.monotonic() + 0.3, poll_s=0.01)
        assert time.monotonic() - t0 < 2
    finally:
        q.close()


def test_silence_times_out(fake):
    server = fake({"query-migrate": [None]})  # never answers
    q = Qmp(server.path, deadline())
    try:
        t0 = time.monotonic()
        with pytest.raises(QemuError, match="no answer in time"):
            q.execute("query-migrate", timeout=0.2)
        assert time.monotonic() - t0 < 2
    finally:
        q.close()


def test_a_closed_connection_and_a_wrong_greeting_are_errors(fake):
    server = fake({}, close_after="query-status")
    q = Qmp(server.path, deadline())
    try:
        with pytest.raises(QemuError, match="closed the connection"):
            q.execute("query-status")
    finally:
        q.close()
    server = fake({}, greeting={"hello": 1})
    with pytest.raises(QemuError, match="expected the QMP greeting"):
        Qmp(server.path, deadline())


def test_a_socket_that_never_appears(tmp_path):
    path = str(tmp_path / "none.sock")
    with pytest.raises(QemuError, match="exited before"):
        Qmp(path, deadline(), alive=lambda: False)
    t0 = time.monotonic()
    with pytest.raises(QemuError, match="did not answer in time"):
        Qmp(path, time.monotonic() + 0.2)
    assert time.monotonic() - t0 < 2


# -- QEMU missing or too old ------------------------------------------------------------


def _fake_binary(tmp_path, version_line: str) -> str:
    path = tmp_path / "qemu-system-aarch64"
    path.write_text(f"#!/bin/sh\necho '{version_line}'\necho 'Copyright (c) 2003-2025'\n")
    path.chmod(0o755)
    return str(path)


def _says_how_to_install(message: str) -> None:
    assert "bookworm-backports" in message
    assert "apt-get install -t bookworm-backports qemu-system-arm" in message
    assert "/etc/apt/sources.list.d/backports.sources" in message
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in message


def test_missing_qemu_says_how_to_get_it(tmp_path):
    with pytest.raises(QemuUnavailable) as caught:
        find_qemu(str(tmp_path / "no-such-qemu"))
    assert "not found" in str(caught.value)
    _says_how_to_install(str(caught.value))
    assert isinstance(caught.value, ConfigError)  # the CLI prints it and exits 2


def test_qemu_7_is_refused_and_10_accepted(tmp_path):
    old = _fake_binary(tmp_path, "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)")
    with pytest.raises(QemuUnavailable, match=r"QEMU 7\.2\.19, older than 10") as caught:
        find_qemu(old)
    _says_how_to_install(str(caught.value))
    new = _fake_binary(tmp_path, "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)")
    assert find_qemu(new) == (new, "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)")
    garbled = _fake_binary(tmp_path, "hello")
    with pytest.raises(QemuUnavailable, match="no QEMU version"):
        find_qemu(garbled)


def test_parse_version():
    assert parse_version("QEMU emulator version 10.0.2 (Debian)") == (10, 0, 2)
    assert parse_version("QEMU emulator version 9.1") == (9, 1, 0)
    assert parse_version("nothing") is None


def test_speed_vs_qemu_without_qemu_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-aarch64 on it
    monkeypatch.setenv("MTE_MIGRATE_CACHE", str(tmp_path / "cache"))
    code = cli.main(["speed", "--vs-qemu", "--sizes", "32MiB", "--kinds", "zero", "--repeat", "1", "--out", ""])
    assert code == 2
    err = capsys.readouterr().err
    assert "qemu-system-aarch64 not found" in err and "bookworm-backports" in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # no image made


# -- helpers ----------------------------------------------------------------------------


def test_cpu_seconds_reads_this_process():
    t = cpu_seconds(os.getpid())
    usage = os.times()
    assert 0 <= t <= usage.user + usage.system + 0.05


def test_loader_pieces_cut_a_large_image_into_consecutive_files(tmp_path):
    image = tmp_path / "img"
    data = os.urandom(5000)
    image.write_bytes(data)
    assert loader_pieces(str(image), chunk=8192) == [(str(image), 0)]
    pieces = loader_pieces(str(image), chunk=2048)
    assert [off for _, off in pieces] == [0, 2048, 4096]
    assert b"".join(open(p, "rb").read() for p, _ in pieces) == data
    assert loader_pieces(str(image), chunk=2048) == pieces  # reused, not cut again


# -- the table's arithmetic -------------------------------------------------------------


def _q(total, cpu_src=0.1, cpu_dst=0.2, status="completed"):
    return {
        "status": status,
        "total_ms": total,
        "downtime_ms": 3,
        "cpu_src": cpu_src,
        "cpu_dst": cpu_dst,
        "ram_total": 200 * MiB,
        "transferred": 10,
    }


def _o(total, cpu_src=0.3, cpu_dst=0.4, ok=True, status="completed"):
    return {
        "status": status,
        "ok": ok,
        "total_ms": total,
        "downtime_ms": 20.0,
        "cpu_src": cpu_src,
        "cpu_dst": cpu_dst,
        "wire_bytes": 11,
    }


def test_medians_and_per_pair_ratios():
    pairs = [
        {"repeat": 1, "first": "qemu", "qemu": _q(100), "ours": _o(300)},
        {"repeat": 2, "first": "ours", "qemu": _q(200), "ours": _o(200)},
        {"repeat": 3, "first": "qemu", "qemu": _q(50), "ours": _o(400)},
    ]
    e = vs_qemu_entry("random", 64 * MiB, pairs)
    assert e["qemu_ms"] == {"median": 100, "min": 50, "max": 200}
    assert e["ours_ms"] == {"median": 300, "min": 200, "max": 400}
    # per pair: 3.0, 1.0, 8.0 -- not the ratio of the medians (3.0) by chance only
    assert e["ratio"] == {"median": 3.0, "min": 1.0, "max": 8.0}
    assert e["qemu_cpu_s"]["sum"]["median"] == pytest.approx(0.3)
    assert e["ours_cpu_s"]["src"]["median"] == pytest.approx(0.3)
    assert e["cpu_ratio"]["median"] == pytest.approx(0.7 / 0.3)
    assert (e["runs"], e["qemu_completed"], e["ours_validated"]) == (3, 3, 3)


def test_a_failed_run_is_counted_and_left_out_of_the_figures():
    pairs = [
        {"repeat": 1, "first": "qemu", "qemu": _q(100), "ours": _o(300)},
        {"repeat": 2, "first": "ours", "qemu": _q(None, status="failed"), "ours": _o(250)},
        {"repeat": 3, "first": "qemu", "qemu": _q(120), "ours": _o(9999, ok=False)},
    ]
    e = vs_qemu_entry("mixed", 64 * MiB, pairs)
    assert (e["qemu_completed"], e["ours_validated"]) == (2, 2)
    assert e["qemu_ms"] == {"median": 110, "min": 100, "max": 120}
    assert e["ours_ms"] == {"median": 275, "min": 250, "max": 300}
    assert e["ratio"] == {"median": 3.0, "min": 3.0, "max": 3.0}  # only the pair where both were good


def test_the_markdown_row():
    pairs = [{"repeat": r, "first": "qemu", "qemu": _q(100 + r), "ours": _o(200 + 2 * r)} for r in (1, 2, 3)]
    doc = {
        "vs_qemu": True,
        "command": "mte-migrate speed --vs-qemu",
        "prealloc": True,
        "qemu": {"binary": "/usr/bin/qemu-system-aarch64", "version": "QEMU emulator version 10.0.2"},
        "host_thp": {"anonymous": "madvise", "shmem": "never"},
        "image_offset_in_qemu": 2 * MiB,
        "summary": [vs_qemu_entry("random", 64 * MiB, pairs)],
    }
    doc["runs"] = {"random-67108864": [{**p, "ours": {**p["ours"], "dest_ram_backing": "4k"}} for p in pairs]}
    text = vs_qemu_markdown(doc)
    assert "prealloc against prealloc" in text and "QEMU emulator version 10.0.2" in text
    assert "anonymous memory `madvise`" in text and "destination RAM: 4k" in text
    assert "QEMU's RAM is backed by transparent huge pages and, in some runs, ours was not" in text
    doc["runs"] = {"random-67108864": [{**p, "ours": {**p["ours"], "dest_ram_backing": "huge"}} for p in pairs]}
    both = vs_qemu_markdown(doc)  # both backed: no warning
    assert "destination RAM: huge" in both and "ours was not" not in both
    assert "| image | QEMU ms | mte-migrate ms | ratio | QEMU CPU s src+dst | ours CPU s src+dst |" in text
    assert (
        "| random 64 MiB | 102 (101–103) | 204 (202–206) | 2.00 (2.00–2.00) | 0.10 + 0.20 = 0.30 (0.30–0.30) | "
        "0.30 + 0.40 = 0.70 (0.70–0.70) | 2.33 (2.33–2.33) | 3 (3–3) | 20 (20–20) | 200 | 3/3 / 3/3 |"
    ) in text


# -- a real QEMU ------------------------------------------------------------------------


def _qemu_10() -> str | None:
    try:
        find_qemu()
    except QemuUnavailable as exc:
        return str(exc).split(".")[0]
    return None


@pytest.mark.slow
@pytest.mark.skipif(_qemu_10() is not None, reason=f"needs qemu-system-aarch64 10.x: {_qemu_10()}")
def test_a_real_qemu_migrates_a_64_mib_guest_and_cleans_up(tmp_path, monkeypatch):
    image = make_image(str(tmp_path / "random.img"), "random", 62 * MiB)  # + 2 MiB below it: a 64 MiB guest
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    procs = []
    popen = qemu_peer.subprocess.Popen

    def spawn(*a, **kw):
        procs.append(popen(*a, **kw))
        return procs[-1]

    monkeypatch.setattr(qemu_peer.tempfile, "mkdtemp", spy)
    monkeypatch.setattr(qemu_peer.subprocess, "Popen", spawn)
    r = qemu_peer.migrate_once(image, prealloc=True, timeout_s=120)
    assert r["status"] == "completed" and r["dest_status"] == "completed", r
    assert r["ram_bytes"] == 64 * MiB and r["version"].startswith("10.")
    assert r["normal_bytes"] >= 62 * MiB  # every random page went as data
    assert r["ram_total"] >= 64 * MiB and r["transferred"] >= 62 * MiB
    assert r["total_ms"] > 0 and r["downtime_ms"] >= 0 and r["cpu_src"] >= 0 and r["cpu_dst"] > 0
    assert made and not any(os.path.exists(d) for d in made)  # sockets and logs removed
    assert len(procs) >= 2 and all(p.poll() is not None for p in procs)  # both QEMUs gone


def test_the_host_huge_page_modes_are_read_from_sysfs(tmp_path):
    from migrate.tools.speed import thp_settings

    (tmp_path / "enabled").write_text("always [madvise] never\n")
    (tmp_path / "shmem_enabled").write_text("always within_size advise [never] deny force\n")
    assert thp_settings(str(tmp_path)) == {"anonymous": "madvise", "shmem": "never"}
    (tmp_path / "shmem_enabled").unlink()
    assert thp_settings(str(tmp_path)) == {"anonymous": "madvise", "shmem": None}
