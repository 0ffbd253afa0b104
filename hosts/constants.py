"""Architectural sizes shared by every module of the simulated host."""

PAGE_SIZE = 4096
PAGE_SHIFT = 12
GRANULE = 16  # bytes covered by one allocation tag
GRANULES_PER_PAGE = PAGE_SIZE // GRANULE  # 256 tags per page
PACKED_TAGS_PER_PAGE = GRANULES_PER_PAGE // 2  # 128 bytes: two 4-bit tags per byte
TAG_SHIFT = 56  # logical tag lives in pointer bits 59:56
TAG_MASK = 0xF

# The arm64 "virt" machine puts RAM at 1 GiB in the guest physical address map.
RAM_BASE_IPA = 0x4000_0000
