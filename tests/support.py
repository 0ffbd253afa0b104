"""Helpers shared by the engine tests (see conftest.py for the fixtures)."""

import asyncio
import platform
import socket
import time
import types

import pytest

from hosts import SimulatedHost
from migrate.engine.digest import MemoryDigest
from migrate.strategies import STRATEGIES

WAIT = 60.0  # generous: the machine is shared and noisy

KERNEL = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
#: the write watch's kernel interfaces arrived in Linux 6.7; on such a
#: kernel a watch that cannot open is a failure, not a skip
needs_watch = pytest.mark.skipif(KERNEL < (6, 7), reason=f"Linux {platform.release()} predates PAGEMAP_SCAN")


def make_hosts(made: list, default_ram: int, default_rate: float):
    """source(): a booted guest with a running workload; dest(): an empty VM."""

    def source(
        ram=default_ram, workload="allocator", strategy="tag-ioctl", rate=default_rate, params=None, seed=7, start=True
    ):
        host = SimulatedHost(
            ram,
            workload=workload,
            workload_params=params,
            rate=rate,
            seed=seed,
            device_prot_mte=STRATEGIES[strategy].vmm_prot_mte,
        )
        made.append(host)
        host.prepare_guest()
        if start:
            host.vcpus.start()
        return host

    def dest(ram=default_ram, huge_pages=False):
        host = SimulatedHost(ram, workload="idle", workload_params={"fill": 0}, rate=0, huge_pages=huge_pages)
        made.append(host)
        return host

    return types.SimpleNamespace(source=source, dest=dest)


def open_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def address(listener):
    return ("127.0.0.1", listener.getsockname()[1])


def digests(host):
    d = MemoryDigest(host.memory)
    return d.data_digest(), d.tag_digest()


def steps_advance(host, within=WAIT) -> bool:
    """The vCPUs make progress (they run, and are not parked)."""
    before = sum(host.vcpus.steps)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if sum(host.vcpus.steps) > before:
            return True
    return False


async def run_engines(src, dst, src_config, listener, dst_config=None, source_cls=None):
    """Both engines concurrently on one loop; returns (source result,
    destination result, source engine, destination engine)."""
    from migrate.engine.dest import DestVmm
    from migrate.engine.source import SourceVmm

    source_engine = (source_cls or SourceVmm)(src, src_config)
    dest_engine = DestVmm(dst, dst_config or src_config)
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    try:
        sres = await asyncio.wait_for(source_engine.migrate(address(listener)), WAIT)
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        dest_task.cancel()
    return sres, dres, source_engine, dest_engine
