"""Tag strategies behind a small interface, in a registry keyed by name."""

from .base import TagStrategy
from .none import NoTags
from .prot_mte import ProtMte
from .tag_dirty_log import TagDirtyLog
from .tag_ioctl import TagIoctl

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
