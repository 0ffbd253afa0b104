"""Errors raised by the simulated kernel, carrying the errno a real one returns."""

import errno as _errno


class KernelError(OSError):
    """A failed system call.  ``errno_name`` is what a real kernel would return
    (``"EINVAL"``, ``"EFAULT"``, ...); the message says which rule was broken."""

    def __init__(self, errno_name: str, message: str):
        super().__init__(getattr(_errno, errno_name), f"{errno_name}: {message}")
        self.errno_name = errno_name
        self.message = message


def einval(message: str) -> KernelError:
    return KernelError("EINVAL", message)


def efault(message: str) -> KernelError:
    return KernelError("EFAULT", message)


class TagCheckFault(Exception):
    """A synchronous tag check fault (SIGSEGV / SEGV_MTESERR) at ``address``:
    the pointer's logical tag differed from the granule's allocation tag."""

    def __init__(self, address: int, logical_tag: int, allocation_tag: int):
        super().__init__(
            f"tag check fault at {address:#x}: pointer tag {logical_tag:#x}, memory tag {allocation_tag:#x}"
        )
        self.address = address
        self.logical_tag = logical_tag
        self.allocation_tag = allocation_tag
