"""Stop strings: cut at the first stop, never show a client any part of one."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ember_core import InvalidRequestError
from ember_functions.stop_strings import StopStringMatcher


def expected_output(text: str, stops: list[str]) -> tuple[str, str | None]:
    """What a stream must show: text before the stop that ends first (ties: starts first)."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return (text, None) if best is None else (text[: best[1]], best[2])


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    shown: list[str] = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        shown.append(text)
        if stopped:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


def test_stop_is_cut_and_not_emitted() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("Hello END world") == ("Hello ", True)
    assert matcher.stopped and matcher.matched == "END"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_partial_stop_is_held_across_deltas() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("Hel") == ("Hel", False)
    assert matcher.feed("lo E") == ("lo ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D and more") == ("", True)


def test_false_alarm_is_released() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("E") == ("", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("TER") == ("ENTER", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.flush() == "EN"
    assert not matcher.stopped and matcher.matched is None


def test_single_string_and_no_stops() -> None:
    assert StopStringMatcher("\n\n").feed("a\n\nb") == ("a", True)
    matcher = StopStringMatcher([])
    assert matcher.feed("anything E") == ("anything E", False)
    assert matcher.flush() == ""


def test_unicode_stops() -> None:
    matcher = StopStringMatcher(["🎉🎉", "終わり"])
    assert matcher.feed("party 🎉") == ("party ", False)
    assert matcher.feed("!") == ("🎉!", False)
    assert matcher.feed("終わ") == ("", False)
    assert matcher.feed("り。") == ("", True)
    assert matcher.matched == "終わり"


def test_stop_that_ends_first_wins() -> None:
    # "c" completes before "abcd" does, in any split of the text.
    for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        matcher = StopStringMatcher(["abcd", "c"])
        shown, stopped = run(matcher, deltas)
        assert "".join(shown) == "ab" and stopped and matcher.matched == "c"


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_never_leak_part_of_a_stop(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c\né"  # few letters, so partial matches and overlaps are common
    for _ in range(200):
        stops = list({"".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(3)})
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
        want, want_stop = expected_output(text, stops)
        matcher = StopStringMatcher(stops)
        shown = ""
        fed = ""
        stopped = False
        for delta in random_split(text, rng):
            fed += delta
            emitted, stopped = matcher.feed(delta)
            shown += emitted
            # Everything shown so far survives in the final output: no stop text ever leaks.
            assert want.startswith(shown), (stops, text)
            if stopped:
                break
            # Only a possible stop beginning is held back.
            assert len(fed) - len(shown) < max(len(s) for s in stops)
        if not stopped:
            shown += matcher.flush()
        assert shown == want, (stops, text)
        assert stopped == (want_stop is not None)
        assert matcher.matched == want_stop


BAD_STOPS: list[tuple[Any, str]] = [
    ([f"s{i}" for i in range(17)], "at most 16"),
    (["ok", ""], r"stop\[1\] must be a non-empty string"),
    (["ok", 3], r"stop\[1\] must be a non-empty string"),
    (["x" * 257], r"stop\[0\] is 257 characters long"),
    (5, "must be a string or a list"),
]


@pytest.mark.parametrize(("stops", "match"), BAD_STOPS)
def test_invalid_stops_are_rejected(stops: Any, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        StopStringMatcher(stops)
    assert info.value.param == "stop"


def test_limits_are_inclusive() -> None:
    StopStringMatcher([f"s{i}" for i in range(16)])
    StopStringMatcher(["x" * 256])
