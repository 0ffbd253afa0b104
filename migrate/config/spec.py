"""Configuration of one migration and of the guest it moves: dataclasses
whose fields, types, defaults and documentation are the option table's."""

from copy import deepcopy
from dataclasses import dataclass, field, fields, replace

from migrate.config import options
from migrate.errors import ConfigError


def _field(option: options.Option):
    doc = {"doc": option.doc or option.help}
    if isinstance(option.default, dict | list):  # each instance its own copy
        return field(default_factory=lambda: deepcopy(option.default), metadata=doc)
    return field(default=option.default, metadata=doc)


def from_table(section: str):
    """Make the class a dataclass with one field per option of ``section``
    in the table, so that a field is declared in one place only."""

    def build(cls):
        cls.__annotations__ = {}
        for option in options.fields_of(section):
            cls.__annotations__[option.name] = (
                option.kind.type if option.default is not None else option.kind.type | None
            )
            setattr(cls, option.name, _field(option))
        return dataclass(cls)

    return build


#: connections that channels = 'auto' opens
AUTO_CHANNELS = 2


@from_table("migration")
class MigrationConfig:
    """How to migrate: the [migration] options of the table (options.py)."""

    @property
    def channel_count(self) -> int:
        """The data connections to open: ``channels``, 2 for 'auto'."""
        return AUTO_CHANNELS if self.channels == "auto" else self.channels

    def check(self) -> "MigrationConfig":
        from migrate.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        if self.compression not in ("auto", "none"):
            try:
                level = int(self.compression)
            except ValueError:
                raise ConfigError(
                    f"compression must be 'auto', 'none' or a zstd level, got {self.compression!r}"
                ) from None
            if not -7 <= level <= 22:
                raise ConfigError(f"zstd level {level} is out of range (-7..22)")
        if not 1 <= self.batch_pages <= 1024:
            raise ConfigError(f"batch_pages must be 1..1024, got {self.batch_pages}")
        from migrate.protocol.frames import checksum_mode

        try:
            self.checksum = checksum_mode(self.checksum)  # scenario files may say true/false
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.channels != "auto" and not (
            isinstance(self.channels, int) and not isinstance(self.channels, bool) and 1 <= self.channels <= 16
        ):
            raise ConfigError(f"channels must be 'auto' or 1..16, got {self.channels!r}")
        if self.tag_batch_pages < 1:
            raise ConfigError("tag_batch_pages must be at least 1")
        if self.max_passes < 0:
            raise ConfigError("max_passes must be 0 or more")
        if self.downtime_limit_ms <= 0:
            raise ConfigError("downtime limit must be positive")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ConfigError("max bandwidth must be positive")
        if self.validate not in ("digest", "reread", "tracked", "full"):
            raise ConfigError(f"validate must be 'digest', 'reread', 'tracked' or 'full', got {self.validate!r}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout must be positive")
        if self.in_doubt_hold_s <= 0:
            raise ConfigError("in-doubt hold must be positive")
        if self.postcopy_hold_s <= 0:
            raise ConfigError("postcopy hold must be positive")
        if self.postcopy_after_passes < 0:
            raise ConfigError("postcopy_after_passes must be 0 or more")
        if self.postcopy and not STRATEGIES[self.strategy].postcopy_mode:
            cls = STRATEGIES[self.strategy]
            able = ", ".join(n for n, c in STRATEGIES.items() if c.postcopy_mode)
            raise ConfigError(f"strategy {self.strategy} cannot do postcopy: {cls.postcopy_refusal}; use one of {able}")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MigrationConfig":
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in d.items() if k in known})


@from_table("guest")
class GuestSpec:
    """The guest to boot and migrate: the [guest] options of the table (options.py)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "GuestSpec":
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in d.items() if k in known})
