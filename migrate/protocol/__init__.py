"""The wire protocol without I/O: frames and their codec, the state machines
of each side, compression and the shared-key proofs.  Imports no asyncio,
no sockets and nothing from hosts/."""
