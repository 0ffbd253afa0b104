"""mte-migrate: the VMM's live-migration software on top of the simulated
host (hosts/): protocol core, transport, precopy engine, tag strategies,
validation, host process runners and the CLI."""

__version__ = "0.1.0"
