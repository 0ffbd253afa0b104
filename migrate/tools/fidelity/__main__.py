"""`python3 -m migrate.tools.fidelity record --kernel 6.12`: see record.py."""

import argparse

from migrate.tools.fidelity.record import SERIES, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m migrate.tools.fidelity")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="boot a real arm64 kernel under QEMU and record its answers")
    rec.add_argument("--kernel", choices=sorted(SERIES), default="6.12", help="Debian kernel series")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.kernel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
