"""Scenarios: TOML files in scenarios/ (read with tomllib) describing a guest
and how to migrate it.  See README.md ("Scenario format")."""

import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError
from migrate.units import parse_rate, parse_size



def _shipped_dir() -> Path:
    """Where the shipped scenarios are: the package data of an install
    (migrate.scenarios, which is the repository's scenarios/ folder), or that
    folder itself when the code runs from a checkout that was never installed."""
    try:
        return Path(str(importlib.resources.files("migrate.scenarios")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "scenarios"


SCENARIO_DIR = _shipped_dir()

# The built-in default, used when no scenario is named (and when the
# scenarios/ folder is not beside the package).
DEFAULT_TOML = """
name = "default"
description = "1 GiB guest running an MTE-aware allocator, migrated with tag-ioctl"

[guest]
ram = "1GiB"
vcpus = 2
workload = "allocator"
rate = 20000
seed = 1

[migration]
strategy = "tag-ioctl"
"""

_GUEST_KEYS = {"ram", "vcpus", "mte", "workload", "rate", "seed", "params", "image", "image_offset", "image_repeat"}
_MIGRATION_KEYS = {
    "strategy",
    "compression",
    "max_bandwidth",
    "downtime_limit_ms",
    "max_passes",
    "auto_converge",
    "throttle_initial",
    "throttle_increment",
    "throttle_max",
    "batch_pages",
    "tag_batch_pages",
    "channels",
    "checksum",
    "prealloc",
    "validate",
    "timeout_s",
    "vm_uuid",
    "in_doubt_hold_s",
    "psk_file",
    "tls_cert",
    "tls_key",
    "tls_ca",
}
# The TOML types each key takes, and how to say so (keys not listed are
# converted by parse()).
_INT, _NUMBER = ((int,), "an integer"), ((int, float), "a number")
_STR, _BOOL = ((str,), "a string"), ((bool,), "true or false")
_TYPES = {
    "vcpus": _INT,
    "mte": _BOOL,
    "workload": _STR,
    "rate": ((int, float, str), "a number or 'max'"),
    "seed": _INT,
    "params": ((dict,), "a table"),
    "image": _STR,
    "image_repeat": _BOOL,
    "strategy": _STR,
    "downtime_limit_ms": _NUMBER,
    "max_passes": _INT,
    "batch_pages": _INT,
    "tag_batch_pages": _INT,
    "channels": _INT,
    "checksum": ((str, bool), "'full', 'meta', 'none' or true/false"),
    "validate": _STR,
    "timeout_s": _NUMBER,
    "vm_uuid": _STR,
    "prealloc": _BOOL,
}


def _check_types(source: str, section: str, values: dict) -> None:
    for key, value in values.items():
        if key not in _TYPES:
            continue
        kinds, want = _TYPES[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(
                f"scenario {source}: [{section}] {key} must be {want}, got {type(value).__name__} {value!r}"
            )


@dataclass
class Scenario:
    name: str
    description: str = ""
    guest: GuestSpec = field(default_factory=GuestSpec)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    source: str = "built-in"


def parse(text: str, source: str = "built-in") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"name", "description", "guest", "migration"}
    if unknown:
        raise ConfigError(f"scenario {source}: unknown top-level keys {sorted(unknown)}")
    for section in ("guest", "migration"):
        if not isinstance(doc.get(section, {}), dict):
            raise ConfigError(f"scenario {source}: [{section}] must be a table")
    guest_doc, mig_doc = dict(doc.get("guest", {})), dict(doc.get("migration", {}))
    for section, keys, allowed in (("guest", guest_doc, _GUEST_KEYS), ("migration", mig_doc, _MIGRATION_KEYS)):
        bad = set(keys) - allowed
        if bad:
            raise ConfigError(f"scenario {source}: unknown [{section}] keys {sorted(bad)}")
        _check_types(source, section, keys)
    try:
        guest = GuestSpec()
        if "ram" in guest_doc:
            guest.ram = parse_size(guest_doc.pop("ram"), "guest RAM")
        if "rate" in guest_doc:
            rate = guest_doc.pop("rate")
            guest.rate = None if rate in ("max", "unlimited") else float(rate)
        if "image_offset" in guest_doc:
            guest.image_offset = parse_size(guest_doc.pop("image_offset"), "image offset")
        for key, value in guest_doc.items():
            setattr(guest, key, value)
        mig = MigrationConfig()
        if "max_bandwidth" in mig_doc:
            mig.max_bandwidth = parse_rate(mig_doc.pop("max_bandwidth"), "max bandwidth")
        if "compression" in mig_doc:
            mig.compression = str(mig_doc.pop("compression"))
        if "checksum" in mig_doc:
            value = mig_doc.pop("checksum")
            if isinstance(value, str) and value not in ("full", "meta", "none"):
                raise ValueError(f"[migration] checksum must be 'full', 'meta', 'none' or true/false, got {value!r}")
            mig.checksum = value if isinstance(value, str) else ("full" if value else "none")
        for key, value in mig_doc.items():
            setattr(mig, key, value)
    except ValueError as exc:
        raise ConfigError(f"scenario {source}: {exc}") from None
    name = doc.get("name") or Path(source).stem
    return Scenario(str(name), str(doc.get("description", "")), guest, mig, source)


def builtin_default() -> Scenario:
    return parse(DEFAULT_TOML)


def available() -> dict[str, Path]:
    """Scenario name -> file, from scenarios/."""
    if not SCENARIO_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


def load(name_or_path: str | None) -> Scenario:
    """A scenario by name (scenarios/NAME.toml), by file path, or the default."""
    if name_or_path is None or name_or_path == "default" and "default" not in available():
        return builtin_default()
    path = Path(name_or_path)
    if not path.suffix and name_or_path in available():
        path = available()[name_or_path]
    if not path.is_file():
        names = ", ".join(available()) or "(none)"
        raise ConfigError(f"no scenario {name_or_path!r}: not a file, and not one of: {names}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc.strerror}") from None
    scenario = parse(text, str(path))
    if scenario.guest.image and not Path(scenario.guest.image).is_absolute():
        candidate = path.parent / scenario.guest.image
        if candidate.exists():
            scenario.guest.image = str(candidate)
    return scenario
