"""``tests/_distributed.run_ranks``, the harness of the multi-process tests: results in rank order, a
failing rank's traceback, and a crashed or hung rank failing the test instead of hanging CI."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from _distributed import run_ranks


def _all_reduce(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return (rank, t.item())


def _fail_on_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 says no")
    return rank


def _abort_on_1(rank, world):
    if rank == 1:
        os.abort()
    return rank


def _hang_on_0(rank, world):
    if rank == 0:
        time.sleep(600)
    return rank


def test_results_in_rank_order():
    assert run_ranks(_all_reduce, 2) == [(0, 3.0), (1, 3.0)]


@pytest.mark.parametrize("fn,match", [(_fail_on_1, "rank 1:.*rank 1 says no"),
                                      (_abort_on_1, "rank 1:.*exited with code")])
def test_failing_or_crashed_rank_fails_the_test(fn, match):
    with pytest.raises(AssertionError, match=f"(?s){match}"):
        run_ranks(fn, 2, timeout=20)


def test_hung_rank_fails_on_the_timeout():
    start = time.monotonic()
    # (rank 1 may also be reported on a machine too busy to import torch within the start-up allowance)
    with pytest.raises(AssertionError, match=r"ranks \[0(, 1)?\] did not finish within 10 s"):
        run_ranks(_hang_on_0, 2, timeout=3, startup=7)
    assert time.monotonic() - start < 30   # killed, not waited for
