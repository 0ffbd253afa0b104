"""Configuration of one migration and of the guest it moves."""

from dataclasses import dataclass, field, fields, replace

from migrate.errors import ConfigError


@dataclass
class MigrationConfig:
    strategy: str = "tag-ioctl"
    """Tag strategy (see ``mte-migrate strategies``)."""
    compression: str = "auto"
    """'auto' (compress when the link is the bottleneck, decided from measured
    throughput and ratio), 'none', or a zstd level such as '1' or '-5'."""
    max_bandwidth: int | None = None
    """Cap on the sending rate in bytes per second (None: uncapped), as QEMU's
    max-bandwidth."""
    downtime_limit_ms: float = 300.0
    """Stop-and-copy once the estimated downtime is at most this."""
    max_passes: int = 30
    """Stop-and-copy after this many dirty passes even if not converged."""
    auto_converge: bool = True
    """Throttle the guest's vCPUs step by step when dirty passes stop
    shrinking (QEMU's auto-converge / cpu-throttle)."""
    throttle_initial: float = 0.2
    throttle_increment: float = 0.1
    throttle_max: float = 0.99
    batch_pages: int = 256
    """Pages per PAGES frame (at most 1024)."""
    tag_batch_pages: int = 256
    """Pages per KVM_ARM_MTE_COPY_TAGS call for the tag-ioctl strategy."""
    channels: int = 2
    """Data connections (like QEMU's multifd); each page always uses the
    same one, so a stale copy can never overtake a newer one."""
    checksum: str = "full"
    """CRC32 per frame: 'full' (payloads too, so corruption is caught at the
    frame where it happens; page data is checked on the landed memory where
    a frame fills a digest chunk), 'meta' (header and metadata only: page
    payloads are proven end to end by the completion digest) or 'none'."""
    validate: str = "digest"
    """'digest': compare per-chunk digests at completion and detail the
    chunks that differ; 'full': compare every page and every tag."""
    timeout_s: float = 8.0
    """A peer silent for this long is declared dead (checked four times per
    period, so detection takes at most 10 s with the default)."""
    vm_uuid: str = ""
    """Identity of the guest; a destination told to expect one refuses others."""
    prealloc: bool = False
    """Destination: allocate all guest RAM when the VM is created, before the
    source connects (QEMU's -mem-prealloc), so landing pages costs a copy, not
    a page allocation.  Costs host memory for RAM the guest never touched."""
    in_doubt_hold_s: float = 60.0
    """How long a side that may own the guest after a lost confirmation keeps
    it paused, waiting to be told (the source: a signal; the destination:
    `mte-migrate resolve`)."""
    tls_cert: str | None = None
    """TLS certificate (PEM) of this side; with tls_key and tls_ca: mutual TLS 1.3."""
    tls_key: str | None = None
    tls_ca: str | None = None
    """CA that signed the peer's certificate."""
    psk_file: str | None = None
    """File holding a shared key: both sides prove it (HMAC challenge/response)
    before any guest byte moves."""

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
        if not 1 <= self.channels <= 16:
            raise ConfigError(f"channels must be 1..16, got {self.channels}")
        if self.tag_batch_pages < 1:
            raise ConfigError("tag_batch_pages must be at least 1")
        if self.max_passes < 0:
            raise ConfigError("max_passes must be 0 or more")
        if self.downtime_limit_ms <= 0:
            raise ConfigError("downtime limit must be positive")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ConfigError("max bandwidth must be positive")
        if self.validate not in ("digest", "full"):
            raise ConfigError(f"validate must be 'digest' or 'full', got {self.validate!r}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout must be positive")
        if self.in_doubt_hold_s <= 0:
            raise ConfigError("in-doubt hold must be positive")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MigrationConfig":
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in d.items() if k in known})


@dataclass
class GuestSpec:
    ram: int = 1 << 30
    """Guest RAM in bytes."""
    vcpus: int = 2
    mte: bool = True
    workload: str = "allocator"
    rate: float | None = 20000
    """Target dirtying rate in pages per second for the whole guest (None: flat out)."""
    seed: int = 1
    params: dict = field(default_factory=dict)
    """Workload parameters (fill, tagged, hot_pages, dma_policy, ...)."""
    image: str | None = None
    """Raw image file to load into guest RAM before the workload starts."""
    image_offset: int = 0
    image_repeat: bool = False

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "GuestSpec":
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in d.items() if k in known})
