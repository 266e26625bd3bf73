"""One collecting thread at a time per server, handed on when its batch closes."""

from __future__ import annotations

import threading

from consumer.turns import Turn, Turns


def test_one_thread_holds_the_turn_until_it_hands_it_on() -> None:
    turn = Turn()
    assert turn.take(1)
    assert turn.take(1)  # holding it already
    assert not turn.take(2)
    turn.give(2)  # not the holder: nothing happens
    assert turn.held_by(1) and not turn.take(2)
    turn.give(1)
    assert turn.take(2) and turn.held_by(2)


def test_a_waiting_thread_gets_the_turn_when_it_is_handed_on() -> None:
    turn = Turn()
    turn.take(1)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(turn.take(2, timeout=30)))
    waiter.start()
    turn.give(1)
    waiter.join(30)
    assert got == [True] and turn.held_by(2)


def test_a_wait_for_a_turn_that_stays_taken_ends_empty_handed() -> None:
    turn = Turn()
    turn.take(1)
    assert not turn.take(2, timeout=0.01)
    assert turn.held_by(1)


def test_each_server_has_one_turn_per_process() -> None:
    turns = Turns()
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
    assert turns.of(a) is turns.of(a)
    assert turns.of(a) is not turns.of(b)
