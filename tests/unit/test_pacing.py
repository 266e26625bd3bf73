"""How the consumer chooses between waiting in beanstalkd and pipelined rounds."""

from __future__ import annotations

import random

from consumer.pacing import QUICK_S, Pace

SLOW = QUICK_S * 10


def test_jobs_that_had_to_be_waited_for_are_taken_one_wait_each() -> None:
    pace = Pace(most=64)
    for _ in range(100):
        pace.waited(True, SLOW)
        assert pace.round_size(64) == 0  # no round: it would find nothing


def test_a_backlog_is_taken_in_rounds_that_double_up_to_the_limit() -> None:
    pace = Pace(most=64)
    pace.waited(True, 0.0)
    assert not pace.backlogged  # one quick answer is not yet a backlog
    pace.waited(True, 0.0)
    assert pace.backlogged
    sizes = []
    for _ in range(20):
        size = pace.round_size(1000)
        sizes.append(size)
        pace.took(size, size)  # the backlog filled every round
    assert sizes[0] == 1 and sizes[-1] == 64
    assert sizes == sorted(sizes)
    assert pace.round_size(10) == 10  # never more than the batch can take


def test_a_round_that_comes_back_short_goes_back_to_waiting() -> None:
    pace = Pace(most=64, credit=100, taking=True)
    pace.took(40, 12)
    assert pace.round_size(64) == 0 and pace.credit == 0


def test_a_timed_out_wait_forgets_the_backlog() -> None:
    pace = Pace(most=64, credit=100, taking=True)
    pace.waited(False, 1.0)
    assert pace.round_size(64) == 0


def test_rounds_waste_at_most_half_a_reserve_per_job_whatever_the_answers() -> None:
    # An adversary: every wait "answers at once" (so rounds are tried as often as
    # possible) and every round finds a random share of what it asked for.
    rng = random.Random(7)
    pace = Pace(most=64)
    jobs = wasted_in_rounds = rounds = 0
    for _ in range(20_000):
        size = pace.round_size(rng.randint(1, 200))
        if size:
            got = rng.choice([size, rng.randint(0, size)])
            rounds += 1
            jobs += got
            wasted_in_rounds += size - got
            pace.took(size, got)
        else:
            got_job = rng.random() < 0.9
            jobs += got_job
            pace.waited(got_job, 0.0)
    assert rounds > 1000 and wasted_in_rounds > 0  # the adversary did get rounds sent
    assert wasted_in_rounds <= 0.5 * jobs
