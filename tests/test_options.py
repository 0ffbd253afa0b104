"""The option table (migrate/config/options.py) against everything that
could drift from it: the command line, the scenario reader, the
configuration dataclasses, and docs/USAGE.md -- its generated option tables
and the hand-written tables of the --json result, checked against real
results of small migrations."""

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from migrate import cli
from migrate.config import options
from migrate.config import scenario as scen
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
USAGE = REPO / "docs" / "USAGE.md"
MiB = 1 << 20
TIMEOUT = 180  # generous: the machine is shared and noisy


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def resolved(*argv):
    """(guest, config) of `mte-migrate run ARGV`, without migrating."""
    guest, config, _ = cli.resolve(cli.build_parser().parse_args(["run", *argv]))
    return guest, config


# -- the generated tables of docs/USAGE.md ----------------------------------------------
def test_usage_md_has_the_option_tables_the_table_generates():
    text = USAGE.read_text()
    assert options.replace_block(text) == text, "run: python -m migrate.config.options --write docs/USAGE.md"


def test_the_docs_check_fails_on_a_doctored_table(tmp_path):
    text = USAGE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `--max-passes N`"))
    doctored = text.replace(row, row.replace("`30`", "`31`"))
    assert doctored != text
    assert options.replace_block(doctored) != doctored
    doc = tmp_path / "USAGE.md"
    doc.write_text(doctored)
    assert options.main(["--check", str(doc)]) == 1
    assert options.main(["--write", str(doc)]) == 0
    assert doc.read_text() == text
    assert options.main(["--check", str(doc)]) == 0


def test_the_generated_block_needs_its_markers():
    with pytest.raises(ValueError, match="markers"):
        options.replace_block("# a doc without the generated block\n")


# -- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("command", sorted(options.MIGRATING))
def test_every_flag_of_a_migrating_command_is_an_option_of_the_table(command):
    actions = [a for a in subcommand(command)._actions if not isinstance(a, argparse._HelpAction)]
    flags = {flag for a in actions for flag in a.option_strings}
    table = {flag for option in options.for_command(command) for flag in option.cli_flags}
    assert flags == table
    for action in actions:
        option = options.BY_NAME[action.dest]
        assert set(action.option_strings) <= set(option.cli_flags), action.option_strings
        assert command in option.commands


def test_the_other_commands_flags_are_documented():
    """bench, speed and resolve are not table commands: their flags are
    documented by hand, and must be."""
    text = USAGE.read_text()
    for command in ("bench", "speed", "resolve"):
        for action in subcommand(command)._actions:
            for flag in action.option_strings:
                assert f"`{flag}" in text or flag in ("-h", "--help"), f"{command} {flag}"
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            if not isinstance(action, argparse._SubParsersAction):
                assert f"`{flag}`" in text, flag


def test_help_quotes_the_real_defaults():
    defaults = {**GuestSpec().to_dict(), **MigrationConfig().to_dict()}
    for action in subcommand("run")._actions:
        found = re.search(r"\(default: (.+)\)$", action.help or "")
        option = options.BY_NAME.get(action.dest)
        if not found or not option.is_field:
            continue
        real = defaults[option.name]
        shown = option.kind.none_word if real is None else option.kind.show(real)
        assert found.group(1) == shown, (action.option_strings, found.group(1), real)
    checksum = next(a for a in subcommand("run")._actions if "--checksum" in a.option_strings)
    assert checksum.help.endswith("(default: full)") and MigrationConfig().checksum == "full"


def test_the_workload_help_names_every_workload():
    from hosts.workloads import WORKLOADS

    help_text = options.BY_NAME["workload"].help
    assert re.findall(r"[\w-]+", help_text.split("(", 1)[1]) == list(WORKLOADS)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text("k" * 32)
    return str(path)


@pytest.fixture
def tls_files(tmp_path):
    paths = [tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem")]
    return [str(p) for p in paths]  # resolve() checks all three are given; reading them is the transport's


#: (command line, the option it sets, the value it must set).
FLAGS = [
    (["--ram", "8MiB"], "ram", 8 * MiB),
    (["--host", "kvm"], "host", "kvm"),
    (["--vcpus", "3"], "vcpus", 3),
    (["--workload", "idle"], "workload", "idle"),
    (["--rate", "max"], "rate", None),
    (["--rate", "250"], "rate", 250.0),
    (["--seed", "9"], "seed", 9),
    (["--fill", "0.3"], "fill", 0.3),
    (["--image", "disk.img"], "image", "disk.img"),
    (["--image-repeat"], "image_repeat", True),
    (["--huge-pages", "off"], "huge_pages", "off"),
    (["--strategy", "prot-mte"], "strategy", "prot-mte"),
    (["--compression", "3"], "compression", "3"),
    (["--max-bandwidth", "125M"], "max_bandwidth", 125_000_000),
    (["--max-bandwidth", "none"], "max_bandwidth", None),
    (["--tcp-congestion", "system"], "tcp_congestion", "system"),
    (["--tcp-congestion", "cubic"], "tcp_congestion", "cubic"),
    (["--downtime-limit", "150"], "downtime_limit_ms", 150.0),
    (["--max-passes", "4"], "max_passes", 4),
    (["--postcopy"], "postcopy", True),
    (["--postcopy", "--postcopy-after-passes", "3"], "postcopy_after_passes", 3),
    (["--no-auto-converge"], "auto_converge", False),
    (["--batch-pages", "64"], "batch_pages", 64),
    (["--tag-batch-pages", "32"], "tag_batch_pages", 32),
    (["--channels", "3"], "channels", 3),
    (["--checksum", "meta"], "checksum", "meta"),
    (["--no-checksum"], "checksum", "none"),
    (["--validate", "tracked"], "validate", "tracked"),
    (["--timeout", "2.5"], "timeout_s", 2.5),
    (["--in-doubt-hold", "5"], "in_doubt_hold_s", 5.0),
    (["--postcopy-hold", "5"], "postcopy_hold_s", 5.0),
    (["--prealloc"], "prealloc", True),
    (["--vm-uuid", "vm-a"], "vm_uuid", "vm-a"),
    (["--psk-file", "KEY"], "psk_file", "KEY"),
    (["--tls-cert", "TLS0", "--tls-key", "TLS1", "--tls-ca", "TLS2"], "tls_cert", "TLS0"),
    (["--tls-cert", "TLS0", "--tls-key", "TLS1", "--tls-ca", "TLS2"], "tls_key", "TLS1"),
    (["--tls-cert", "TLS0", "--tls-key", "TLS1", "--tls-ca", "TLS2"], "tls_ca", "TLS2"),
]


def test_every_flag_of_a_setting_is_exercised_below():
    settable = {o.name for o in options.OPTIONS if o.section and o.cli_flags}
    assert {name for _, name, _ in FLAGS} == settable


@pytest.mark.parametrize("argv, name, value", FLAGS, ids=[" ".join(f[0][:2]) + " " + f[1] for f in FLAGS])
def test_a_flag_sets_its_setting(argv, name, value, key_file, tls_files):
    swap = {"KEY": key_file, "TLS0": tls_files[0], "TLS1": tls_files[1], "TLS2": tls_files[2]}
    value = swap.get(value, value)
    guest, config = resolved("--ram", "16MiB", *[swap.get(a, a) for a in argv])
    option = options.BY_NAME[name]
    if option.workload_param:
        assert guest.params[name] == value
    else:
        assert getattr(guest if option.section == "guest" else config, name) == value


def test_without_the_flag_the_scenario_value_stands():
    scenario = scen.load("hot-set")
    guest, config = resolved("--scenario", "hot-set")
    assert (config.max_passes, config.max_bandwidth) == (scenario.migration.max_passes, 20_000_000)
    guest, config = resolved("--scenario", "hot-set", "--max-passes", "3", "--fill", "0.5")
    assert config.max_passes == 3 and config.max_bandwidth == 20_000_000
    assert guest.params == {**scenario.guest.params, "fill": 0.5}


def test_bad_values_name_the_flag():
    for argv, words in (
        (["--ram", "banana"], "--ram 'banana' is not a size"),
        (["--rate", "fast"], "--rate 'fast' is not a number of pages per second or 'max'"),
        (["--vcpus", "two"], "--vcpus 'two' is not an integer"),
        (["--timeout", "soon"], "--timeout 'soon' is not a number"),
        (["--max-bandwidth", "fast"], "--max-bandwidth 'fast' is not a size"),
        (["--tcp-congestion", "a b"], "--tcp-congestion 'a b' is not 'auto', 'system' or the name of a congestion"),
        (["--tcp-congestion", "x" * 16], "is not 'auto', 'system' or the name"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            resolved(*argv)


def test_an_empty_psk_file_is_a_usage_error(capsys):
    assert cli.main(["run", "--psk-file", ""]) == 2
    err = capsys.readouterr().err
    assert "--psk-file is empty (an unset variable?); give the key file's path" in err


def test_the_commands_own_settings_are_typed_with_their_defaults():
    parse = cli.build_parser().parse_args
    dest = parse(["dest", "--listen", "127.0.0.1:0"])
    assert (dest.run_after, dest.attempts, dest.expect_uuid, dest.scenario) == (0.0, 1, None, "default")
    source = parse(["source", "--connect", "a:1", "--connect", "b:2", "--retry", "2", "-q"])
    assert (source.connect, source.retry, source.warmup, source.quiet) == (["a:1", "b:2"], 2, 0.2, True)
    assert parse(["endurance"]).hops == 100
    assert parse(["run"]).retry == 0 and parse(["run"]).no_summary is False
    assert parse(["run", "--no-summary", "--spec", "x.json"]).spec == "x.json"


# -- the scenario reader and the dataclasses ---------------------------------------------
@pytest.mark.parametrize("cls, section", [(GuestSpec, "guest"), (MigrationConfig, "migration")])
def test_every_field_is_an_option_of_its_section(cls, section):
    table = {o.name: o for o in options.fields_of(section)}
    assert [f.name for f in fields(cls)] == list(table)
    instance = cls()
    for f in fields(cls):
        assert getattr(instance, f.name) == table[f.name].default
        assert f.metadata["doc"] == (table[f.name].doc or table[f.name].help)


def test_the_example_scenario_reads_back_as_the_defaults():
    s = scen.parse(options.example_scenario(), "example.toml")
    assert s.guest == GuestSpec() and s.migration == MigrationConfig()
    assert s.migration.check() == MigrationConfig()


@pytest.mark.parametrize("section", scen.SECTIONS)
def test_a_section_accepts_exactly_its_options(section):
    for option in options.OPTIONS:
        line = options.toml_line(option) if option.has_default else f'{option.name} = "x"'
        text = f"[{section}]\n{line}\n"
        if option.section == section and option.is_field:
            scen.parse(text, "probe.toml")
        else:
            with pytest.raises(ConfigError, match=rf"unknown \[{section}\] keys \['{option.name}'\]"):
                scen.parse(text, "probe.toml")


def test_a_scenario_and_the_command_line_convert_alike():
    s = scen.parse('[guest]\nram = "8MiB"\nrate = "max"\n[migration]\nmax_bandwidth = "125M"\ncompression = 3\n')
    guest, config = resolved("--ram", "8MiB", "--rate", "max", "--max-bandwidth", "125M", "--compression", "3")
    assert (s.guest.ram, s.guest.rate) == (guest.ram, guest.rate)
    assert (s.migration.max_bandwidth, s.migration.compression) == (config.max_bandwidth, config.compression)


# -- the --json result fields --------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _mte(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "migrate", *map(str, args)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kw,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Real results of small migrations: `run` (with --prealloc, so the
    destination reports its preallocation), a dest and source pair by hand,
    and a short endurance run."""
    tmp = tmp_path_factory.mktemp("results")
    guest = ["--ram", "4MiB", "--quiet", "--prealloc"]
    cp = _mte("run", *guest, "--json", tmp / "run.json")
    assert cp.returncode == 0, cp.stderr
    dest = subprocess.Popen(
        [sys.executable, "-m", "migrate", "dest", "--listen", "127.0.0.1:0", *guest, "--json", tmp / "dest.json"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = dest.stdout.readline().strip()
        assert line.startswith("listening on "), line
        cp = _mte("source", "--connect", line.removeprefix("listening on "), *guest)
        assert cp.returncode == 0, cp.stderr
        assert dest.wait(timeout=TIMEOUT) == 0, dest.stderr.read()
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
        dest.stdout.close()
        dest.stderr.close()
    cp = _mte("endurance", "--hops", 6, "--ram", "4MiB", "--quiet", "--json", tmp / "endurance.json")
    assert cp.returncode == 0, cp.stderr
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("run", "dest", "endurance")}


#: Keys that are data, not names: how the docs write them.
PLACEHOLDERS = {"growth": "PROCESS:ROLE", "reports": "PROCESS"}


def paths(value, prefix: str = "") -> set[str]:
    """Every field of a result as the docs name it: ``ram.total_bytes``,
    ``passes[].pages``; the keys of ``counters`` are counter names, not fields."""
    found = set()
    if isinstance(value, dict):
        for key, item in value.items():
            key = PLACEHOLDERS.get(prefix.rpartition(".")[2], key) if prefix else key
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            if path != "counters":
                found |= paths(item, path)
    elif isinstance(value, list):
        for item in value:
            found |= paths(item, prefix + "[]")
    return found - {""}


def documented(text: str) -> dict[str, set[str]]:
    """The fields in the first column of each table of the --json section, by subsection."""
    section = text.split("\n## The `--json` result", 1)[1]
    tables = {}
    for part in section.split("\n### ")[1:]:
        heading, _, body = part.partition("\n")
        tables[heading] = set(re.findall(r"^\| `([^`]+)` \|", body, re.M))
    return tables


def _string_literals() -> set[str]:
    found = set()
    for path in (REPO / "migrate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
            elif isinstance(node, ast.keyword) and node.arg:
                found.add(node.arg)  # dict(key=...) and .update(key=...)
    return found


def drift(results: dict, text: str) -> list[str]:
    """What the --json section of ``text`` gets wrong about ``results``: real
    fields it does not document, and documented fields no result has."""
    docs = documented(text)
    every, some = docs["Every result"], docs["Fields that appear only in some results"]
    dest, endurance = docs["`dest --json`"], docs["`endurance --json`"]
    run_paths, dest_paths, end_paths = (paths(results[n]) for n in ("run", "dest", "endurance"))
    problems = [f"undocumented: {p}" for p in sorted(run_paths - every - some)]
    problems += [f"undocumented in dest --json: {p}" for p in sorted(dest_paths - every - some - dest)]
    problems += [f"undocumented in endurance --json: {p}" for p in sorted(end_paths - endurance)]
    problems += [f"documented but not in a result: {p}" for p in sorted(every - run_paths)]
    problems += [f"documented but not in a dest result: {p}" for p in sorted(dest - dest_paths)]
    problems += [f"documented but not in an endurance report: {p}" for p in sorted(endurance - end_paths)]
    literals = _string_literals()
    for field in sorted(some):
        if field.rpartition(".")[2].removesuffix("[]") not in literals:
            problems.append(f"documented but nowhere in the code: {field}")
    return problems


def test_every_result_field_is_documented_and_every_documented_field_is_real(results):
    assert drift(results, USAGE.read_text()) == []


def test_the_result_checker_fails_on_a_doctored_doc(results):
    text = USAGE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `ram.mbps` |"))
    assert drift(results, text.replace(row + "\n", "")) == [
        "undocumented: ram.mbps",
        "undocumented in dest --json: ram.mbps",
    ]
    bogus = "| `ram.bogus_bytes` | bytes | | Not a field. |\n"
    assert drift(results, text.replace(row + "\n", row + "\n" + bogus)) == [
        "documented but not in a result: ram.bogus_bytes"
    ]
    some_row = "| `in_doubt.cause` |"
    assert drift(results, text.replace(some_row, "| `in_doubt.no_such_key` |")) == [
        "documented but nowhere in the code: in_doubt.no_such_key"
    ]


def test_counters_are_named_by_side(results):
    counters = results["run"]["counters"]
    assert counters and all(k.split(".", 1)[0] in ("source", "destination") for k in counters)
