"""What a migration is told: the option table (options.py), the
configuration built from it (spec.py), and scenario files (scenario.py)."""
