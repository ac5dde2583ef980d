"""The deferred-update ledger: what each block still owes, with absolute positions that survive forgetting."""

from zo2_lightning.engine.ledger import Commit, CommitLedger


def _c(step):
    return Commit(step, 0.5, (1e-3,), (0.0,), seed=7)


def test_positions_stay_valid_while_absorbed_commits_are_forgotten():
    log = CommitLedger(2, keep=2)
    for s in range(3):
        log.add(_c(s))
    taken = log.head  # block 1 acquired now, caught up to position 3
    log.absorbed(0, 3)
    assert [c.step for c in log.since(1)] == [0, 1, 2] and log.pending == 3
    log.absorbed(1, taken)  # now every block holds all 3: they are forgotten
    assert log.since(0) == [] and log.keys() == set() and log.head == 3
    log.add(_c(3))
    assert [c.step for c in log.since(1)] == [3] and log.pending == 2


def test_a_lagging_block_keeps_its_commits():
    log = CommitLedger(2, keep=1)
    for s in range(4):
        log.add(_c(s))
    log.absorbed(0, 4)
    assert [c.step for c in log.since(1)] == [0, 1, 2, 3]
    log.absorbed(1, 2)  # partial: the first two go
    assert [c.step for c in log.since(1)] == [2, 3] and log.keys() == {(2, 7), (3, 7)}
    log.clear()
    assert log.pending == 0 and log.since(1) == []
