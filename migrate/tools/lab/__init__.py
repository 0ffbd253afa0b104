"""`mte-migrate lab`: two emulated arm64 machines (QEMU, TCG) with a real
Linux KVM and MTE, a migration between them with ``--host kvm``."""
