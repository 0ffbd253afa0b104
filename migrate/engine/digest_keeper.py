"""The source's validation digest, kept up to date in a thread of its own
while the guest runs."""

import asyncio
import logging
import threading
import time

from migrate.engine.digest import MemoryDigest
from migrate.errors import one_line

log = logging.getLogger("migrate.engine.digest_keeper")


#: how often the keeper asks the write watch while the guest writes: a guest
#: at 5,000 pages/s leaves ~250 pieces to read at the pause
_SCAN_EVERY = 0.05
_SCAN_AT_MOST_EVERY = 0.4


class DigestKeeper:
    """Keeps the source's validation digest up to date in its own thread
    while the guest runs, a slice of chunks at a time.  (As an asyncio task
    it waited for the event loop, which a pass keeps busy -- lane 0 builds
    and sends inline -- so the pieces the guest dirtied during the bulk pass
    were still stale at the pause.)

    Its digest learns what the guest wrote either from the dirty-log
    harvests (``validate = "tracked"``: someone else marks it stale) or,
    with ``watch``, from the host's write watch, which it asks itself before
    each slice.  With the watch it reads a chunk only once the guest wrote
    it: the bulk pass's checked frames hand over the CRCs of the chunks they
    read, and one neither read is read at the pause, one CRC call on cores
    the bulk pass no longer holds (read beside the bulk pass it cost two to
    three times the CPU: an image migration's source took 0.69-0.79 s a GiB
    against 0.55-0.64 with everything read at the pause)."""

    def __init__(self, digest: MemoryDigest, watch=None, front=None, tag_watch=None):
        """``front``: a callable giving the first chunk the bulk pass has not
        sent yet, or None once it is over; chunks never read are read only
        below it, where the sender has just read them -- and, with checked
        frames, handed over their CRCs, so that a chunk written before the
        sender reached it is not read at all (three runs, before that
        hand-over: the keeper's CPU 0.27-0.41 s against 0.38-0.48 s
        without, within this machine's spread)."""
        self._digest, self._watch, self._front, self._stop = digest, watch, front, threading.Event()
        self._tag_watch = tag_watch  # a watch over the tag storage, if the host has one
        #: what keeping it cost, for the report: this thread's CPU seconds,
        #: the watch's scans and the pages they found written
        self.cpu_s, self.scans, self.pages_written = 0.0, 0, 0
        self._quiet = False
        self._thread = threading.Thread(target=self._run, name="digest-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        began = time.thread_time()
        idle_wait = _SCAN_EVERY
        try:
            while not self._stop.is_set():
                if self._watch is not None:
                    self.scans += 1
                    written = self._watch.written()
                    for a, b in written:
                        self.pages_written += b - a
                        self._digest.mark_stale(a, b)
                    self._quiet = self.pages_written == 0
                    if self._tag_watch is not None:
                        for a, b in self._tag_watch.written():
                            self._digest.mark_tags_stale(a, b)
                    # a guest that writes nothing is asked less often (a walk
                    # of 1 GiB is 0.6-1 ms; the pause asks once more anyway)
                    idle_wait = _SCAN_EVERY if written else min(2 * idle_wait, _SCAN_AT_MOST_EVERY)
                chunks = self._digest.pending_chunks(limit=64, unread=self._watch is None)
                front = self._front() if self._front is not None else None
                if front is not None:
                    chunks = [c for c in chunks if c < front or not self._digest.unread[c]]
                if chunks:
                    # stop between chunks: the final digest, at the pause,
                    # waits for this (a whole slice was 5-7 ms of downtime)
                    self._digest.refresh(chunks, stop=self._stop)
                else:
                    self._stop.wait(idle_wait if self._watch is not None else 0.02)
        except Exception as exc:  # the final digest then reads everything again
            log.warning("validation digest keeper stopped: %s", one_line(exc))
            self._digest.invalidate()
        finally:
            self.cpu_s = time.thread_time() - began

    def quiet(self) -> bool:
        """Whether the write watch has been asked, and has found no page of
        RAM written since it began (the guest may still write later)."""
        return self._quiet

    def stop_now(self) -> None:
        """Stop it and wait, blocking, until the chunk it reads is done."""
        self._stop.set()
        self._thread.join()

    async def stop(self) -> None:
        """Stop it and wait until the chunk it reads is done."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop_now)
