"""Throw-away certificates for mutual TLS (the benchmark's `tls` case and the
TLS tests), made with the `openssl` command: a CA and, for each name, a key
and a certificate it signed.  Not for production: one-day certificates with
unencrypted keys."""

import shutil
import subprocess
from pathlib import Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ec_request(key: Path, out: Path, subject: str, *extra) -> None:
    _openssl(
        "req", *extra, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", out, "-subj", subject,
    )  # fmt: skip


def make_pki(path: Path, name: str, who=("dest", "source")) -> dict:
    """{"ca": CA certificate, WHO: (certificate, key) for each of ``who``}."""
    path = Path(path)
    ca_key, ca = path / f"{name}-ca.key", path / f"{name}-ca.pem"
    _ec_request(ca_key, ca, f"/CN={name} CA", "-x509", "-days", "1")
    out = {"ca": str(ca)}
    for w in who:
        key, csr, cert = path / f"{name}-{w}.key", path / f"{name}-{w}.csr", path / f"{name}-{w}.pem"
        _ec_request(key, csr, f"/CN={w}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1")
        out[w] = (str(cert), str(key))
    return out
