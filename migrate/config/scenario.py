"""Scenarios: TOML files in scenarios/ (read with tomllib) describing a guest
and how to migrate it.  Their keys are the option table's (options.py); see
docs/USAGE.md."""

import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from migrate.config import options
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError


def _shipped_dir() -> Path:
    """Where the shipped scenarios are: the package data of an install
    (migrate.scenarios, which is the repository's scenarios/ folder), or that
    folder itself when the code runs from a checkout that was never installed."""
    try:
        return Path(str(importlib.resources.files("migrate.scenarios")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "scenarios"


SCENARIO_DIR = _shipped_dir()

#: The scenario `mte-migrate run` migrates when none is named.
DEFAULT = "default"
SECTIONS = ("guest", "migration")


def _read_section(source: str, section: str, values: dict, target) -> None:
    """Set ``target``'s fields from one section's keys, each checked and
    converted as its option in the table says."""
    known = {option.toml_key: option for option in options.OPTIONS if option.section == section and option.toml_key}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"scenario {source}: unknown [{section}] keys {sorted(unknown)}")
    for key, value in values.items():
        kind = known[key].kind
        if not isinstance(value, kind.toml_types) or (isinstance(value, bool) and bool not in kind.toml_types):
            raise ConfigError(
                f"scenario {source}: [{section}] {key} must be {kind.want}, got {type(value).__name__} {value!r}"
            )
        try:
            options.assign(target, known[key], kind.parse(value, f"[{section}] {key}"))
        except ValueError as exc:
            raise ConfigError(f"scenario {source}: {exc}") from None


@dataclass
class Scenario:
    name: str
    description: str = ""
    guest: GuestSpec = field(default_factory=GuestSpec)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    source: str = "<text>"


def parse(text: str, source: str = "<text>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"name", "description", "guest", "migration"}
    if unknown:
        raise ConfigError(f"scenario {source}: unknown top-level keys {sorted(unknown)}")
    for section in SECTIONS:
        if not isinstance(doc.get(section, {}), dict):
            raise ConfigError(f"scenario {source}: [{section}] must be a table")
    guest, migration = GuestSpec(), MigrationConfig()
    for section, target in zip(SECTIONS, (guest, migration)):
        _read_section(source, section, doc.get(section, {}), target)
    name = doc.get("name") or Path(source).stem
    return Scenario(str(name), str(doc.get("description", "")), guest, migration, source)


def default() -> Scenario:
    """The shipped default scenario (its keys are the table's defaults)."""
    return load(DEFAULT)


def available() -> dict[str, Path]:
    """Scenario name -> file, from scenarios/."""
    if not SCENARIO_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


def load(name_or_path: str | None) -> Scenario:
    """A scenario by name (scenarios/NAME.toml), by file path, or (None) the default."""
    name_or_path = name_or_path or DEFAULT
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
