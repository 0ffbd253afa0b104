"""Tag strategies behind a small interface, in a registry keyed by name."""

from migrate.strategies.base import TagStrategy
from migrate.strategies.none import NoTags
from migrate.strategies.prot_mte import ProtMte
from migrate.strategies.tag_dirty_log import TagDirtyLog
from migrate.strategies.tag_ioctl import TagIoctl

STRATEGIES: dict[str, type[TagStrategy]] = {cls.name: cls for cls in (TagIoctl, ProtMte, NoTags, TagDirtyLog)}
DEFAULT_STRATEGY = "tag-ioctl"


def register(cls: type[TagStrategy]) -> type[TagStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def get(name: str) -> type[TagStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
