"""What a migration is told: the option table, the configuration built from
it, and scenario files."""

from migrate.config.spec import GuestSpec, MigrationConfig

__all__ = ["GuestSpec", "MigrationConfig"]
