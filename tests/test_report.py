"""The human summary: where the downtime went."""

from migrate.engine.report import empty_result, summary


def _completed():
    r = empty_result("default", "tag-ioctl")
    r.update(
        status="completed",
        total_time_ms=2900.0,
        setup_time_ms=30.0,
        downtime_ms=790.0,
        dirty_sync_count=2,
        guest_on="destination",
        downtime_breakdown_ms={"final_memory": 537.6, "state": 2.8, "completion": 250.4},
        digest={
            "taken": "kept from the dirty-log harvests",
            "trusts_dirty_tracking": True,
            "chunks_read_at_pause": 984,
            "mib_read_at_pause": 212.5,
            "final_ms": 597.6,
        },
        destination={"final_digest": {"stale_chunks": 393, "stale_mib": 31.0, "ms": 94.7}},
    )
    r["ram"]["transferred_bytes"] = 1
    return r


def test_summary_splits_the_downtime_and_names_the_digests():
    lines = summary(_completed()).splitlines()
    split = next(x for x in lines if x.strip().startswith("downtime split:"))
    assert split.strip() == "downtime split: final pages 538 ms, state 3 ms, completion 250 ms"
    digests = next(x for x in lines if x.strip().startswith("validation digests after the pause:"))
    assert "source 598 ms (984 chunks, 212.5 MiB of dirty pieces brought up to date" in digests
    assert "destination 95 ms (393 chunks, 31 MiB of dirty pieces)" in digests


def test_summary_of_a_result_without_stale_bytes_names_chunks_only():
    r = _completed()
    r["digest"]["mib_read_at_pause"] = None
    del r["destination"]["final_digest"]["stale_mib"]
    digests = next(x for x in summary(r).splitlines() if "digests after the pause" in x)
    assert "source 598 ms (984 chunks brought up to date" in digests and "destination 95 ms (393 chunks)" in digests


def test_summary_of_the_default_digest_says_it_read_memory_again():
    r = _completed()
    r["digest"].update(taken="re-read after the pause", trusts_dirty_tracking=False, mib_read_at_pause=1024.0)
    digests = next(x for x in summary(r).splitlines() if "digests after the pause" in x)
    assert "source 598 ms (1024 MiB of populated RAM and its tags read again" in digests


def test_summary_says_what_was_compared():
    r = _completed()
    r["validation"].update(mode="digest", ok=True, compared="per-chunk CRCs ...; device state: none")
    assert "    compared: per-chunk CRCs ...; device state: none" in summary(r).splitlines()


def test_summary_without_a_downtime_has_no_split():
    r = empty_result("default", "tag-ioctl")
    r.update(status="failed", error="connection refused")
    assert "downtime split" not in summary(r) and "digests after the pause" not in summary(r)


def test_summary_split_without_digest_figures():
    r = _completed()
    r["digest"] = None
    r.pop("destination")
    text = summary(r)
    assert "  downtime split: final pages 538 ms, state 3 ms, completion 250 ms\n" in text
    assert "digests after the pause" not in text
