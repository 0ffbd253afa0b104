"""The tag-strategy interface: how the VMM gets at guest tags.

A strategy reaches guest memory and tags only through the simulated
kernel's interfaces (the VMM's mappings and the KVM ioctls), as a real VMM
would.  Data moves through ``read_data`` / ``write_data`` because a strategy
may change which mapping the VMM uses (prot-mte maps all RAM PROT_MTE, so
even plain data copies are tag checked unless TCO is set).
"""

from abc import ABC, abstractmethod
from typing import ClassVar


class TagStrategy(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    #: a design no public work has built; labelled as such everywhere
    proposal: ClassVar[bool] = False
    #: how tags travel: "packed4" (two tags per byte, 128 bytes a page) or "none"
    tag_format: ClassVar[str] = "packed4"
    #: whether the VMM maps guest RAM PROT_MTE (device emulation then goes through it)
    vmm_prot_mte: ClassVar[bool] = False
    #: postcopy: the userfaultfd mode its placement needs ("missing" or
    #: "minor"); None: it cannot place tags in postcopy and refuses --postcopy
    postcopy_mode: ClassVar[str | None] = None
    #: a postcopy variant: the strategy it is identical to until the postcopy
    #: switch (bench leaves it out unless named)
    postcopy_variant_of: ClassVar[str | None] = None
    #: postcopy: the window in which the guest can see a page without its tags, if any
    postcopy_race: ClassVar[str] = ""
    #: postcopy: why not, when postcopy_mode is None (for the refusal)
    postcopy_refusal: ClassVar[str] = "it has no way to place a page and its tags for a running guest"

    def __init__(self, host, config):
        self.host = host
        self.vm = host.vm
        self.config = config
        self.mapping = host.ram

    # -- source side -----------------------------------------------------------
    def setup_source(self) -> None:
        """Called once before the first page is read."""

    def read_data(self, first_page: int, npages: int) -> memoryview:
        """A view of guest RAM pages (no copy)."""
        return self.mapping.read(first_page * 4096, npages * 4096)

    @abstractmethod
    def read_tags(self, ranges: list) -> bytes | None:
        """Packed tags (128 bytes a page) of every page in ``ranges`` (a list
        of (first_page, count)), in order; None when the strategy moves no tags."""

    def harvest_tag_dirty(self) -> bytes | None:
        """Get-and-clear the pages whose tags were stored without their data
        (one byte a page), for strategies with a separate tags-dirty log;
        None for the others, whose tag stores dirty the page itself."""
        return None

    # -- destination side --------------------------------------------------------
    def setup_dest(self) -> None:
        """Called once before the first page arrives."""

    def write_data(self, offset: int, data, populated: bool = False) -> None:
        """Store guest RAM bytes; ``populated``: every page was written before."""
        self.mapping.memory.write(offset, data, populated)

    def write_data_parts(self, offset: int, parts) -> None:
        """Store consecutive buffers at ``offset`` (one system call)."""
        self.mapping.memory.write_parts(offset, parts)

    @abstractmethod
    def write_tags(self, first_page: int, packed) -> None:
        """Store packed tags for a run of consecutive pages."""

    @abstractmethod
    def clear_tags(self, first_page: int, npages: int) -> None:
        """The pages' tags are now all zero (they arrived without tags but
        carried tags before)."""

    # -- destination side, postcopy ---------------------------------------------------
    def place_postcopy(self, uffd, page: int, data, packed_tags) -> None:
        """Make ``page`` (whole pages of ``data``, their packed tags) present
        to the running guest, through the registered userfaultfd."""
        raise NotImplementedError(f"{self.name} cannot place pages in postcopy")

    def close(self) -> None:
        pass
