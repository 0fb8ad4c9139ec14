"""``DurableLedger``: the durability decisions of the engine service, as plain data (no broker, no disk)."""

from __future__ import annotations

from hotlora.engine.kafka.ledger import MAX_REPLIES, DurableLedger


def test_records_commit_once_a_snapshot_covers_them() -> None:
    ledger: DurableLedger[str] = DurableLedger()
    ledger.released("a", 1, mutating=True)  # create
    assert ledger.tracked("a") and ledger.unpublished("a", 1)
    ledger.answered("a", 1, "r1", mutating=True, reply=b"created")
    assert not ledger.unpublished("a", 1)
    assert ledger.commit_when_durable("a", 1, True, "rec1") == []  # waits for the create's snapshot
    ledger.released("a", 2, mutating=True)  # forward_backward
    ledger.answered("a", 2, "r2", mutating=True, reply=b"fb")
    assert ledger.commit_when_durable("a", 2, True, "rec2") == []
    assert ledger.covered("a", 1) == ["rec1"]  # the create's snapshot: only seq 1 commits
    assert ledger.durable_seq("a") == 1 and ledger.stored_reply("a", "r1") == b"created"
    assert ledger.covered("a", 3) == ["rec2"]  # the next optim_step's snapshot covers the gradients too
    assert ledger.commit_when_durable("a", 2, True, "again") == ["again"]  # a re-delivery below the mark


def test_a_sample_after_the_last_step_moves_the_mark_without_a_snapshot() -> None:
    ledger: DurableLedger[str] = DurableLedger()
    ledger.adopt("a", 3, {})
    ledger.released("a", 4, mutating=False)
    ledger.released("a", 5, mutating=True)
    ledger.answered("a", 4, "s4", mutating=False, reply=b"sample")
    assert ledger.commit_when_durable("a", 4, False, "rec4") == [] and ledger.wants_advance
    assert ledger.advances() == [("a", 4)]  # seq 5 is still open: the mark stops before it
    assert ledger.advanced("a", 4) == ["rec4"] and ledger.durable_seq("a") == 4


def test_an_adapter_without_durable_state_commits_at_once_and_forget_releases_its_records() -> None:
    ledger: DurableLedger[str] = DurableLedger()
    assert ledger.commit_when_durable("x", 1, False, "sample") == ["sample"]  # unknown adapter
    ledger.released("a", 1, mutating=True)
    ledger.answered("a", 1, "r1", mutating=True, reply=b"err")
    assert ledger.commit_when_durable("a", 1, True, "rec1") == []
    assert ledger.covered("a", 1, snapshot_written=False) == ["rec1"]  # the create failed: nothing to keep
    assert not ledger.tracked("a")
    ledger.adopt("b", 2, {})
    ledger.released("b", 3, mutating=True)
    ledger.answered("b", 3, "r3", mutating=True, reply=b"")
    assert ledger.commit_when_durable("b", 3, True, "rec3") == []
    assert ledger.forget("b") == ["rec3"] and ledger.durable_seq("b") == 0


def test_replies_kept_per_adapter_are_bounded() -> None:
    ledger: DurableLedger[str] = DurableLedger()
    for seq in range(1, 3 * MAX_REPLIES):
        ledger.answered("a", seq, f"r{seq}", mutating=True, reply=b"x")
    kept = ledger.replies("a")
    assert len(kept) <= 2 * MAX_REPLIES and f"r{3 * MAX_REPLIES - 1}" in kept and "r1" not in kept


def test_a_snapshot_keeps_no_reply_of_a_later_request() -> None:
    """The chaos test's lost step: a snapshot captured at seq 13 was written after seq 14-16 were answered
    and stored their replies; an engine restarted from it answered 14-16 from those replies although the
    state lacked their effect, so the agent's next optim_step returned a version it had already seen."""
    ledger: DurableLedger[str] = DurableLedger()
    ledger.adopt("a", 11, {})
    for seq in (12, 13, 14, 15):
        ledger.released("a", seq, mutating=True)
        ledger.answered("a", seq, f"r{seq}", mutating=True, reply=f"reply {seq}".encode())
    assert sorted(s for s, _ in ledger.replies("a", upto=13).values()) == [12, 13]
    assert len(ledger.replies("a")) == 4
    restarted: DurableLedger[str] = DurableLedger()
    restarted.adopt("a", 13, ledger.replies("a"))  # a snapshot written before the rule kept all four
    assert restarted.stored_reply("a", "r13") == b"reply 13"
    assert restarted.stored_reply("a", "r14") is None and restarted.stored_reply("a", "r15") is None
