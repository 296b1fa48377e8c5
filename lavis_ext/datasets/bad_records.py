"""One policy for records a dataset cannot use, in shards and in annotation files alike: ``on_bad_record``.

A bad record is one whose text or image cannot be used as it is: undecodable or non-UTF-8 JSON, an empty
caption, a question without answers, a missing, truncated or corrupt image, a damaged tar member.

- ``skip`` (default): the record is left out, counted by reason in the dataset's ``skipped``, and the first
  few are logged with where they are (``file:line`` for JSON/JSONL, shard and key for tars). Training on web
  data always meets some; one bad line in 10M must not stop a run.
- ``error``: the first bad record raises :class:`BadRecordError` naming where it is and what is wrong, for
  curated sets where any bad record is a bug to fix before training.

Set it per dataset: ``datasets.<name>.on_bad_record: error``.
"""
from __future__ import annotations

import logging
from collections import Counter

__all__ = ["DEFAULT_POLICY", "POLICIES", "BadRecordError", "BadRecordLog", "resolve_policy"]

POLICIES = ("skip", "error")
DEFAULT_POLICY = "skip"


class BadRecordError(ValueError):
    """A record that cannot be used, under ``on_bad_record: error``; the message names the file:line or
    shard/key, the reason, and how to skip such records instead."""

    def __init__(self, where: str, reason: str, detail: str, name: str = "datasets.<name>"):
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(
            f"{where}: bad record ({reason}: {detail}); fix or remove it, or set {name}.on_bad_record=skip "
            "to leave such records out and count them"
        )


def resolve_policy(value, where: str = "datasets.<name>.on_bad_record") -> str:
    """``value`` (None = the default) as one of :data:`POLICIES`.

    Raises:
        ValueError: any other value, naming ``where`` and the valid ones.
    """
    if value is None:
        return DEFAULT_POLICY
    policy = str(value).strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"{where}={value!r} is not a policy; valid: {', '.join(POLICIES)} (default {DEFAULT_POLICY})")
    return policy


class BadRecordLog:
    """The policy applied to one split: :meth:`add` raises under ``error``; under ``skip`` it counts the record by
    reason and keeps (and logs) the first ``max_examples`` of each reason, so one flood of empty captions does not
    hide the first missing image. Picklable, so it travels to DataLoader workers (counts are then per process).

    Args:
        policy: ``skip`` | ``error`` | None (the default, ``skip``).
        name: the config prefix the messages name, e.g. ``datasets.json_caption``.
        label: how log lines name the split (default ``name``), e.g. ``json_caption/train``.
        max_examples: examples kept and logged per reason.
        logger: where the lines go (default this module's).

    Raises:
        ValueError: an unknown policy (names ``<name>.on_bad_record`` and the valid ones).
    """

    def __init__(self, policy=None, name: str = "datasets.<name>", label: str | None = None, max_examples: int = 5,
                 logger: logging.Logger | None = None):
        self.policy = resolve_policy(policy, f"{name}.on_bad_record")
        self.name = name
        self.label = label or name
        self.max_examples = int(max_examples)
        self.logger = logger or logging.getLogger(__name__)
        self.counts: Counter = Counter()
        self.examples: list[dict] = []  # {"where", "reason", "detail"}

    def add(self, where: str, reason: str, detail: str) -> None:
        """One bad record at ``where`` (``FILE line N``, ``shard key``); ``reason`` is a short stable code
        (``not_utf8``, ``no_caption``, ``corrupt_image``, ...), ``detail`` says what is wrong for people.

        Raises:
            BadRecordError: under ``error``.
        """
        if self.policy == "error":
            raise BadRecordError(where, reason, detail, self.name)
        self.counts[reason] += 1
        seen = self.counts[reason]
        if seen <= self.max_examples:
            self.examples.append({"where": where, "reason": reason, "detail": detail})
            self.logger.warning("%s: skipping %s (%s: %s)", self.label, where, reason, detail)
        elif seen == self.max_examples + 1:
            self.logger.warning("%s: more %s records; only counting them from now on (see dataset.skipped)",
                                self.label, reason)

    def summary(self) -> str:
        """``"3 bad record(s) skipped (no_caption 2, not_utf8 1)"``, or ``""`` when none was."""
        if not self.counts:
            return ""
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.counts.items())
        return f"{sum(self.counts.values())} bad record(s) skipped ({reasons})"
