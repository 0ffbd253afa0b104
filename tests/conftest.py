"""Fixtures shared by the engine tests (two hosts in one process, joined over
a loopback listener).  A test module may set RAM and SOURCE_RATE to change
the defaults of the ``hosts`` factory."""

import types

import pytest
from support import make_hosts, open_listener

MiB = 1 << 20


@pytest.fixture
def hosts(request):
    """Factory for simulated hosts; every host made is closed at teardown."""
    made = []
    factory = make_hosts(made, getattr(request.module, "RAM", 32 * MiB), getattr(request.module, "SOURCE_RATE", 5000))
    yield types.SimpleNamespace(source=factory.source, dest=factory.dest)
    for host in made:
        host.close()


@pytest.fixture
def listener():
    sock = open_listener()
    yield sock
    sock.close()
