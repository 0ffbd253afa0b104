"""CRC-32 (zlib's polynomial) from the fastest implementation installed.

zlib-ng's and ISA-L's crc32 return the same values as the standard library's,
so a host with an accelerator and a host without one agree on every frame and
every digest: only the speed differs (about 28, 21 and 5 GB/s on the machines
this was measured on).  Install the ``fast`` extra for zlib-ng.
"""

import zlib


def _fastest():
    """(crc32, name) of the first implementation that imports."""
    try:
        from zlib_ng.zlib_ng import crc32 as ng

        return ng, "zlib-ng"
    except ImportError:
        pass
    try:
        from isal.isal_zlib import crc32 as isal

        return isal, "isal"
    except ImportError:
        return zlib.crc32, "zlib"


crc32, IMPLEMENTATION = _fastest()
