"""Scenarios (migrate/config/scenario.py): TOML parsing, unknown keys and
wrong types rejected with messages that name them, the shipped default, and
loading by name or path."""

import pytest

from migrate.config import scenario as scen
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError

GiB, MiB = 2**30, 2**20

FULL = """
name = "custom"
description = "a test scenario"

[guest]
ram = "512MiB"
vcpus = 4
mte = true
workload = "hot-set"
rate = 15000
seed = 7
params = { fill = 0.25, hot_pages = 8192 }
image_offset = "1MiB"
image_repeat = true

[migration]
strategy = "none"
compression = 3
max_bandwidth = "50M"
downtime_limit_ms = 150
max_passes = 8
batch_pages = 512
tag_batch_pages = 64
checksum = false
validate = "full"
timeout_s = 2.5
vm_uuid = "abc"
"""


def test_parse_full_scenario():
    s = scen.parse(FULL, "test.toml")
    assert s.name == "custom" and s.description == "a test scenario" and s.source == "test.toml"
    g, m = s.guest, s.migration
    assert (g.ram, g.vcpus, g.mte, g.workload, g.rate, g.seed) == (512 * MiB, 4, True, "hot-set", 15000.0, 7)
    assert g.params == {"fill": 0.25, "hot_pages": 8192}
    assert (g.image_offset, g.image_repeat) == (MiB, True)
    assert (m.strategy, m.compression, m.max_bandwidth) == ("none", "3", 50_000_000)
    assert (m.downtime_limit_ms, m.max_passes, m.batch_pages, m.tag_batch_pages) == (150, 8, 512, 64)
    assert (m.checksum, m.validate, m.timeout_s, m.vm_uuid) == ("none", "full", 2.5, "abc")  # false = none
    m.check()  # a valid configuration


def test_parse_minimal_scenario_uses_defaults_and_file_stem():
    s = scen.parse("", "/some/where/quiet.toml")
    assert s.name == "quiet"
    assert s.guest == GuestSpec()
    assert s.migration == MigrationConfig()


@pytest.mark.parametrize(
    "rate, expected", [('"max"', None), ('"unlimited"', None), ("0", 0.0), ("2.5", 2.5), ('"300"', 300.0)]
)
def test_rate_values(rate, expected):
    assert scen.parse(f"[guest]\nrate = {rate}\n").guest.rate == expected


def test_max_bandwidth_none():
    assert scen.parse('[migration]\nmax_bandwidth = "none"\n').migration.max_bandwidth is None


def test_scenarios_do_not_share_mutable_defaults():
    a, b = scen.parse(""), scen.parse("")
    a.guest.params["fill"] = 0.5
    assert b.guest.params == {}


@pytest.mark.parametrize(
    "text, names",
    [
        ('colour = "blue"\n', "unknown top-level keys ['colour']"),
        ("bogus = 1\nzzz = 2\n", "unknown top-level keys ['bogus', 'zzz']"),
        ("[guest]\nram_size = '1GiB'\n", "unknown [guest] keys ['ram_size']"),
        ("[guest]\nwokload = 'idle'\nvcpu = 2\n", "unknown [guest] keys ['vcpu', 'wokload']"),
        ("[migration]\nmax_bandwith = '1G'\n", "unknown [migration] keys ['max_bandwith']"),
        ("[migrate]\nstrategy = 'none'\n", "unknown top-level keys ['migrate']"),
    ],
)
def test_unknown_keys_are_rejected_by_name(text, names):
    with pytest.raises(ConfigError) as info:
        scen.parse(text, "x.toml")
    assert str(info.value) == f"scenario x.toml: {names}"


@pytest.mark.parametrize(
    "text",
    [
        "[guest\nram = 1\n",
        "name = \n",
        "[guest]\nram = 1GiB\n",  # unquoted
        "name = 'a'\nname = 'b'\n",  # duplicate key
        "\x00",
    ],
)
def test_bad_toml_is_rejected(text):
    with pytest.raises(ConfigError, match="^scenario bad.toml: not valid TOML: "):
        scen.parse(text, "bad.toml")


@pytest.mark.parametrize(
    "text, match",
    [
        ('[guest]\nram = "lots"\n', r"scenario w.toml: \[guest\] ram 'lots' is not a size"),
        ('[guest]\nrate = "fast"\n', r"scenario w.toml: \[guest\] rate 'fast' is not a number of pages per second"),
        ("[guest]\nram = 1.5\n", r"\[guest\] ram must be a size like 512MiB or a number of bytes, got float"),
        ('[guest]\nimage_offset = "x"\n', r"scenario w.toml: \[guest\] image_offset 'x' is not a size"),
        (
            '[migration]\nmax_bandwidth = "quick"\n',
            r"scenario w.toml: \[migration\] max_bandwidth 'quick' is not a size",
        ),
        (
            '[migration]\nvalidate = "some"\n',
            r"\[migration\] validate must be 'digest', 'reread', 'tracked' or 'full', got 'some'",
        ),
        ('[migration]\npsk_file = ""\n', r"\[migration\] psk_file is empty \(an unset variable\?\)"),
        ('[guest]\nvcpus = "2"\n', r"scenario w.toml: \[guest\] vcpus must be an integer, got str '2'"),
        ("[guest]\nvcpus = 2.0\n", r"\[guest\] vcpus must be an integer, got float"),
        ("[guest]\nseed = true\n", r"\[guest\] seed must be an integer, got bool"),
        ("[guest]\nmte = 1\n", r"\[guest\] mte must be true or false, got int"),
        ("[guest]\nparams = 5\n", r"\[guest\] params must be a table, got int"),
        ("[guest]\nworkload = 3\n", r"\[guest\] workload must be a string, got int"),
        ("[guest]\nrate = [1]\n", r"\[guest\] rate must be a number or 'max', got list"),
        ('[migration]\nmax_passes = "ten"\n', r"\[migration\] max_passes must be an integer, got str"),
        ("[migration]\nbatch_pages = 2.5\n", r"\[migration\] batch_pages must be an integer, got float"),
        ('[migration]\ndowntime_limit_ms = "300"\n', r"\[migration\] downtime_limit_ms must be a number, got str"),
        ("[migration]\ntimeout_s = false\n", r"\[migration\] timeout_s must be a number, got bool"),
        (
            '[migration]\nchecksum = "no"\n',
            r"\[migration\] checksum must be 'full', 'meta', 'none' or true/false, got 'no'",
        ),
        (
            "[migration]\nchecksum = 1\n",
            r"\[migration\] checksum must be 'full', 'meta', 'none' or true/false, got int",
        ),
        ('[migration]\nstrategy = ["none"]\n', r"\[migration\] strategy must be a string, got list"),
        ("guest = 5\n", r"scenario w.toml: \[guest\] must be a table"),
        ('migration = "fast"\n', r"scenario w.toml: \[migration\] must be a table"),
    ],
)
def test_wrong_value_types_are_config_errors_naming_the_key(text, match):
    # Each of these used to pass parse() and fail later with a TypeError
    # traceback (e.g. `vcpus < 1` on a str) instead of a ConfigError.
    with pytest.raises(ConfigError, match=match):
        scen.parse(text, "w.toml")


def test_the_default_scenario_is_the_shipped_file():
    s = scen.default()
    assert s.name == "default" and s.source == str(scen.available()["default"])
    assert s.guest.ram == 1 * GiB
    assert s.guest.workload == "allocator"
    assert s.guest.mte is True
    assert s.migration.strategy == "tag-ioctl"
    assert s.migration.compression == "auto"
    assert s.migration.downtime_limit_ms == 300.0
    s.migration.check()


def test_load_none_is_the_default():
    d = scen.load(None)
    assert (d.guest.ram, d.guest.workload, d.migration.strategy) == (GiB, "allocator", "tag-ioctl")
    assert d == scen.load("default") == scen.default()


def test_the_shipped_default_sets_exactly_the_table_defaults():
    # So `mte-migrate run --help` tells the truth about a bare `mte-migrate run`.
    d = scen.default()
    assert d.guest == GuestSpec()
    assert d.migration == MigrationConfig()


def test_every_shipped_scenario_loads_and_checks():
    names = scen.available()
    assert {"default", "idle", "allocator", "retag-churn", "stream", "hot-set", "device-dma", "image"} <= set(names)
    for name, path in names.items():
        s = scen.load(name)
        assert s.name == name
        assert s.source == str(path)
        s.migration.check()
        assert s.guest.ram > 0 and s.guest.ram % 4096 == 0


def test_load_missing_name_lists_the_available_scenarios():
    with pytest.raises(ConfigError) as info:
        scen.load("no-such-scenario")
    msg = str(info.value)
    assert msg.startswith("no scenario 'no-such-scenario': not a file, and not one of: ")
    for name in scen.available():
        assert name in msg


def test_load_missing_name_without_a_scenario_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(scen, "SCENARIO_DIR", tmp_path / "absent")
    assert scen.available() == {}
    with pytest.raises(ConfigError, match=r"not one of: \(none\)"):
        scen.load("hot-set")
    with pytest.raises(ConfigError, match=r"no scenario 'default'"):
        scen.load(None)  # a broken install says so rather than inventing a default


def test_load_by_path(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[guest]\nram = "64MiB"\nworkload = "idle"\n')
    s = scen.load(str(p))
    assert (s.name, s.source, s.guest.ram, s.guest.workload) == ("mine", str(p), 64 * MiB, "idle")


def test_load_by_path_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('[guest]\nram = "64MiB"\nfoo = 1\n')
    with pytest.raises(ConfigError, match=f"scenario {p}: unknown \\[guest\\] keys \\['foo'\\]"):
        scen.load(str(p))
    with pytest.raises(ConfigError, match="no scenario"):
        scen.load(str(tmp_path))  # a directory is not a scenario


def test_relative_image_is_resolved_beside_the_scenario(tmp_path):
    (tmp_path / "disk.img").write_bytes(b"\1" * 4096)
    p = tmp_path / "img.toml"
    p.write_text('[guest]\nimage = "disk.img"\n')
    assert scen.load(str(p)).guest.image == str(tmp_path / "disk.img")
    p.write_text('[guest]\nimage = "missing.img"\n')
    assert scen.load(str(p)).guest.image == "missing.img"
