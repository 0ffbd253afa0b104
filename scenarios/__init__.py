"""The shipped scenarios: TOML files, installed as package data of
migrate.scenarios (see pyproject.toml) and read with importlib.resources."""
