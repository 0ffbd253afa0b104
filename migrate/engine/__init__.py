"""The migration engines: the source and the destination VMM, split into
their phases, with convergence, page batches, digests, validation and the
in-doubt recovery."""
