"""An asyncio event loop on a thread of its own: each extra data channel runs
on one, so the parts that release the GIL (socket I/O, CRC32, zstd, pwrite)
run in parallel with the control connection's loop."""

import asyncio
import threading


class LoopThread:
    """A thread running its own asyncio event loop."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> asyncio.Future:
        """Run ``coro`` on this thread's loop; awaitable from another loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        """Cancel whatever still runs on the loop, then end the thread."""

        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(3):  # let the callbacks they queued (deferred socket closes) run
                await asyncio.sleep(0)
            self.loop.stop()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(drain(), self.loop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
