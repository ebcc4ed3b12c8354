"""Live migration of a confidential guest (`testbed migrate`): testbed/migrate/migration.py
runs it, status.py resyncs the encryption status, oracle.py checks every page."""

from __future__ import annotations

from testbed.migrate.migration import (
    DEFAULT_ROUNDS,
    DEFAULT_SLICE_EXITS,
    MIGRATE_VM_TYPES,
    Migration,
    MigrationError,
    MigrationRefusedError,
    MigrationReport,
    RoundStats,
    migrate,
    migration_options,
)

__all__ = [
    "DEFAULT_ROUNDS",
    "DEFAULT_SLICE_EXITS",
    "MIGRATE_VM_TYPES",
    "Migration",
    "MigrationError",
    "MigrationRefusedError",
    "MigrationReport",
    "RoundStats",
    "migrate",
    "migration_options",
]
