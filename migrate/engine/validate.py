"""Comparing what the destination holds with what the source holds.

Both sides read their simulated kernel's memory and tag storage directly
(digest.py), never through the strategy under test.  The source compares the
per-chunk CRCs; chunks that differ (or, in 'full' mode, every chunk) are
then compared page by page, and the first mismatches name the page and, for
tags, the granules."""

from dataclasses import dataclass, field

from hosts import tags as tagops
from hosts.constants import PACKED_TAGS_PER_PAGE
from migrate.engine.digest import CHUNK_PAGES, DETAIL_PER_PAGE

MAX_REPORTED = 10


@dataclass
class Validation:
    mode: str
    pages_checked: int = 0
    data_mismatches: int = 0
    tag_mismatches: int = 0
    state_ok: bool | None = None
    first_mismatches: list = field(default_factory=list)
    #: what was compared with what, in words, for the report
    compared: str = ""

    @property
    def ok(self) -> bool:
        return not self.data_mismatches and not self.tag_mismatches and self.state_ok is not False

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "pages_checked": self.pages_checked,
            "data_mismatches": self.data_mismatches,
            "tag_mismatches": self.tag_mismatches,
            "state_ok": self.state_ok,
            "first_mismatches": self.first_mismatches,
            "compared": self.compared,
        }

    def summary(self) -> str:
        parts = []
        if self.data_mismatches:
            parts.append(f"{self.data_mismatches} pages with different data")
        if self.tag_mismatches:
            parts.append(f"{self.tag_mismatches} pages with different tags")
        if self.state_ok is False:
            parts.append("vCPU/device state differs (as loaded on the destination)")
        return "validation failed: " + ", ".join(parts) if parts else "validation ok"


def differing_chunks(src_data, src_tags, dst_data, dst_tags) -> list[int]:
    return [c for c in range(len(src_data)) if src_data[c] != dst_data[c] or src_tags[c] != dst_tags[c]]


def compare_detail(validation: Validation, chunks: list[int], mine: bytes, theirs: bytes, npages: int) -> None:
    """Compare page_detail() outputs of the same chunks from both sides."""
    if len(mine) != len(theirs):
        raise ValueError("page detail lengths differ")
    pos = 0
    for c in chunks:
        first = c * CHUNK_PAGES
        for page in range(first, min(first + CHUNK_PAGES, npages)):
            a = mine[pos : pos + DETAIL_PER_PAGE]
            b = theirs[pos : pos + DETAIL_PER_PAGE]
            pos += DETAIL_PER_PAGE
            if a == b:
                continue
            if a[:4] != b[:4]:
                validation.data_mismatches += 1
                _report(validation, {"page": page, "kind": "data"})
            if a[4:] != b[4:]:
                validation.tag_mismatches += 1
                if len(validation.first_mismatches) < MAX_REPORTED:
                    ua, ub = tagops.unpack(a[4:]), tagops.unpack(b[4:])
                    granules = [g for g in range(2 * PACKED_TAGS_PER_PAGE) if ua[g] != ub[g]]
                    _report(
                        validation,
                        {
                            "page": page,
                            "kind": "tags",
                            "granules": _compact(granules),
                            "source_tag": ua[granules[0]],
                            "destination_tag": ub[granules[0]],
                        },
                    )


def _report(validation: Validation, item: dict) -> None:
    if len(validation.first_mismatches) < MAX_REPORTED:
        validation.first_mismatches.append(item)


def _compact(granules: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    out, start, prev = [], None, None
    for g in granules + [None]:
        if start is None:
            start = prev = g
        elif g is not None and g == prev + 1:
            prev = g
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = g
    return ",".join(out)
