"""Lab tools on top of the engines: bench, speed, endurance, the machine's
ceilings, the cost model, raw images and the fault-injecting proxy.
Only the CLI imports this package."""
