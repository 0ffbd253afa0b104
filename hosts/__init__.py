"""The simulated host machine: guest RAM with MTE tag storage, a KVM-like
kernel interface (copy-tags ioctl, dirty log, VMM mappings) and guest vCPU
workloads.  It knows nothing about migration."""

from .backend import BACKENDS, Host, HostUnavailable, make_host
from .constants import GRANULE, GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE
from .counters import Counters
from .errors import KernelError, TagCheckFault
from .host import SimulatedHost
from .kernel import (
    KVM_ARM_TAGS_FROM_GUEST,
    KVM_ARM_TAGS_TO_GUEST,
    DirtyLog,
    Kernel,
    Memslot,
    Vm,
)
from .mapping import TagCheckMode, VmmMapping
from .memory import GuestMemory
from .vcpu import VcpuSet, VcpuState

__all__ = [
    "BACKENDS",
    "Host",
    "HostUnavailable",
    "make_host",
    "GRANULE",
    "GRANULES_PER_PAGE",
    "PAGE_SIZE",
    "PACKED_TAGS_PER_PAGE",
    "KernelError",
    "TagCheckFault",
    "Counters",
    "GuestMemory",
    "KVM_ARM_TAGS_FROM_GUEST",
    "KVM_ARM_TAGS_TO_GUEST",
    "DirtyLog",
    "Kernel",
    "Memslot",
    "Vm",
    "TagCheckMode",
    "VmmMapping",
    "VcpuSet",
    "VcpuState",
    "SimulatedHost",
]
