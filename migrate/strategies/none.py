from migrate.strategies.base import TagStrategy


class NoTags(TagStrategy):
    """Data only: the baseline for the cost of tags, and the proof that
    validation catches lost tags."""

    name = "none"
    description = "data only, no tags (baseline; validation fails on tagged guests)"
    tag_format = "none"
    postcopy_refusal = "it moves no tags"

    def read_tags(self, ranges):
        return None

    def write_tags(self, first_page, packed):
        raise RuntimeError("the none strategy receives no tags")

    def clear_tags(self, first_page, npages):
        pass
