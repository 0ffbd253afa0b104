"""Fidelity: the simulated host kernel (hosts/) held to a real arm64 kernel's
answers.  record.py boots a Debian arm64 kernel under QEMU with probe.c as
its /init and writes one golden line per case; cases.py replays the same
cases on hosts/ (tests/test_fidelity.py compares).  See docs/FIDELITY.md."""
