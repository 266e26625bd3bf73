from __future__ import annotations

from consumer.batch import Batch, halves


def test_batch_is_due_when_full_before_linger() -> None:
    batch: Batch[str] = Batch(max_events=100, linger_s=10.0)
    batch.add("job-1", 60, now=0.0)
    assert not batch.due(0.1)
    batch.add("job-2", 40, now=0.2)
    assert batch.full and batch.due(0.2)


def test_batch_is_due_at_linger_deadline_counted_from_first_job() -> None:
    batch: Batch[str] = Batch(max_events=1000, linger_s=0.2)
    batch.add("job-1", 5, now=1.0)
    batch.add("job-2", 5, now=1.15)
    assert not batch.due(1.19)
    assert abs(batch.remaining(1.1) - 0.1) < 1e-9
    assert batch.due(1.2)


def test_empty_batch_is_never_due() -> None:
    batch: Batch[str] = Batch(max_events=1, linger_s=0.0)
    assert not batch.due(100.0)
    assert batch.remaining(5.0) == 0.0


def test_halves_cover_everything_once() -> None:
    items = list(range(7))
    left, right = halves(items)
    assert left + right == items and left and right
    assert halves([1]) == ([], [1])


def test_jobs_wanted_estimates_what_fills_the_batch() -> None:
    batch: Batch[str] = Batch(max_events=1000, linger_s=1.0)
    assert batch.jobs_wanted(64) == 1  # nothing known yet about job sizes
    batch.add("job-1", 25, now=0.0)
    assert batch.jobs_wanted(64) == 39  # 975 more events at 25 per job
    assert batch.jobs_wanted(8) == 8  # capped
    batch.add("job-2", 970, now=0.0)
    assert batch.jobs_wanted(64) == 1  # 5 missing: at least one job
    batch.add("job-3", 5, now=0.0)
    assert batch.jobs_wanted(64) == 0  # full
