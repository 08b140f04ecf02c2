"""Table tests of the per-key register checker (`geomesh.register_history`): each rule, both ways."""

from __future__ import annotations

import pytest

from geomesh.register_history import Read, Write, check

W = [Write("k", 1, 0.0, 1.0), Write("k", 2, 2.0, 3.0), Write("k", 3, 4.0, None), Write("k", 4, 6.0, 7.0)]

CASES = [
    # (read, rule broken or None)
    (Read("k", None, -1.0, 0.5), None),          # before any write ended: the initial value is fine
    (Read("k", 1, 0.5, 0.8), None),              # concurrent with its write
    (Read("k", 2, 0.5, 2.5), None),              # concurrent with write 2
    (Read("k", 1, 3.5, 3.8), "stale"),           # write 2 was acknowledged before the read began
    (Read("k", None, 1.5, 1.8), "stale"),        # write 1 was acknowledged: the key is not empty
    (Read("k", 3, 8.0, 9.0), None),              # an unacknowledged write may apply late
    (Read("k", 4, 5.0, 5.5), "future"),          # write 4 began after the read ended
    (Read("k", 9, 1.0, 2.0), "unwritten"),
    (Read("k", 2, 8.0, 9.0), "stale"),           # write 4 was acknowledged at 7
    (Read("x", None, 0.0, 1.0), None),           # a key nobody wrote
]


@pytest.mark.parametrize(("read", "rule"), CASES)
def test_rules(read: Read, rule: str | None) -> None:
    assert [v.rule for v in check(W, [read])] == ([rule] if rule else [])


def test_a_read_may_not_go_back_behind_an_earlier_read() -> None:
    ws = [Write("k", 1, 0.0, 1.0), Write("k", 2, 2.0, 10.0)]
    # the first read saw 2 while write 2 was in flight; a later read must not see 1 again
    bad = check(ws, [Read("k", 2, 3.0, 4.0), Read("k", 1, 5.0, 6.0)])
    assert [v.rule for v in bad] == ["backwards"]
    # overlapping reads may see either order
    assert check(ws, [Read("k", 2, 3.0, 5.5), Read("k", 1, 5.0, 6.0)]) == []


def test_a_history_that_breaks_the_one_writer_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        check([Write("k", 1, 0.0, 2.0), Write("k", 2, 1.0, 3.0)], [Read("k", 1, 0.0, 1.0)])
