"""`mte-migrate speed --protection`: the cost of protecting the stream,
measured (small images: this checks the tool, not the figures)."""

import pytest

from migrate.errors import ConfigError
from migrate.tools import protection
from migrate.tools.pki import have_openssl


def test_unknown_protection_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="got 'ipsec'"):
        protection.run([4 << 20], ["random"], ["none", "ipsec"], 1, None, True, "test")


def test_each_protection_migrates_validated_and_is_compared_with_none(tmp_path):
    cases = ["none", "psk"] + (["tls"] if have_openssl() else [])
    doc = protection.run([4 << 20], ["random"], cases, 1, str(tmp_path), True, "test")
    rows = {e["protection"]: e for e in doc["summary"]}
    assert set(rows) == set(cases)
    assert all(e["validated"] == e["runs"] == 1 for e in rows.values())
    assert rows["none"]["time_vs_none"] == 1.0
    assert rows["psk"]["time_vs_none"] == rows["psk"]["total_ms"] / rows["none"]["total_ms"]
    # each run really had the protection it is listed under
    assert {r["protection"] for r in doc["runs"]["random-4194304-psk"]} == {"psk-mac"}
    assert "| random 4 MiB | psk |" in (tmp_path / "protection.md").read_text()
