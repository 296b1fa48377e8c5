"""The ``on_bad_record`` policy: ``skip`` counts by reason and keeps the first few of each, ``error`` stops at the first."""
from __future__ import annotations

import logging
import pickle
from collections import Counter

import pytest

from lavis_ext.datasets.bad_records import BadRecordError, BadRecordLog, resolve_policy


def test_resolve_policy_defaults_to_skip_and_names_the_key_of_a_bad_value():
    assert resolve_policy(None) == "skip" and resolve_policy(" Error ") == "error"
    with pytest.raises(ValueError, match=r"datasets.mine.on_bad_record='drop' is not a policy; valid: skip, error"):
        resolve_policy("drop", "datasets.mine.on_bad_record")
    with pytest.raises(ValueError, match=r"datasets.mine.on_bad_record='drop'"):
        BadRecordLog("drop", name="datasets.mine")


def test_skip_counts_every_record_but_keeps_and_logs_only_the_first_of_each_reason(caplog):
    log = BadRecordLog(name="datasets.mine", label="mine/train", max_examples=2, logger=logging.getLogger("t.bad"))
    with caplog.at_level(logging.WARNING, logger="t.bad"):
        for n in range(1, 6):
            log.add(f"a.jsonl line {n}", "no_caption", "record has no non-empty caption")
        log.add("a.jsonl line 9", "not_utf8", "byte 0xe9 at column 3 (file offset 80) is not UTF-8")
    assert log.counts == Counter({"no_caption": 5, "not_utf8": 1})
    assert [e["where"] for e in log.examples] == ["a.jsonl line 1", "a.jsonl line 2", "a.jsonl line 9"]
    assert log.summary() == "6 bad record(s) skipped (no_caption 5, not_utf8 1)"
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "mine/train: skipping a.jsonl line 1 (no_caption: record has no non-empty caption)"
    assert sum("more no_caption records" in line for line in lines) == 1 and len(lines) == 4
    assert "a.jsonl line 9" in lines[-1]  # a flood of one reason does not hide the first of another
    clone = pickle.loads(pickle.dumps(log))  # datasets carry it into DataLoader workers
    assert clone.counts == log.counts and clone.examples == log.examples and clone.policy == "skip"


def test_error_raises_at_the_first_naming_where_what_and_the_way_out():
    log = BadRecordLog("error", name="datasets.json_caption")
    with pytest.raises(BadRecordError) as err:
        log.add("data.jsonl line 7", "no_caption", "record has no non-empty caption")
    assert str(err.value) == (
        "data.jsonl line 7: bad record (no_caption: record has no non-empty caption); fix or remove it, or set "
        "datasets.json_caption.on_bad_record=skip to leave such records out and count them"
    )
    assert (err.value.where, err.value.reason) == ("data.jsonl line 7", "no_caption")
    assert isinstance(err.value, ValueError) and not log.counts and log.summary() == ""
