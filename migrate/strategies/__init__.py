"""Tag strategies behind a small interface, in a registry keyed by name."""

from migrate.strategies.base import TagStrategy
from migrate.strategies.none import NoTags
from migrate.strategies.postcopy import MemfdContinue, UffdCopyTags
from migrate.strategies.prot_mte import ProtMte
from migrate.strategies.tag_dirty_log import TagDirtyLog
from migrate.strategies.tag_ioctl import TagIoctl

STRATEGIES: dict[str, type[TagStrategy]] = {
    cls.name: cls for cls in (TagIoctl, ProtMte, NoTags, TagDirtyLog, UffdCopyTags, MemfdContinue)
}
DEFAULT_STRATEGY = "tag-ioctl"
#: what bench compares by default: the postcopy variants are tag-ioctl until the switch
BENCH_STRATEGIES = [name for name, cls in STRATEGIES.items() if cls.postcopy_variant_of is None]
POSTCOPY_STRATEGIES = [name for name, cls in STRATEGIES.items() if cls.postcopy_mode]


def register(cls: type[TagStrategy]) -> type[TagStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def get(name: str) -> type[TagStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
