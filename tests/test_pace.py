"""The lab's slowdown factor: only a runner that knows it emulates the CPU raises it, within a cap."""

from meshintercept.lab import pace


def test_timeouts_are_native_unless_the_runner_says_it_emulates(monkeypatch):
    monkeypatch.delenv(pace.ENV, raising=False)
    assert pace.scaled(40) == 40
    monkeypatch.setenv(pace.ENV, "10")
    assert pace.scaled(40) == 400


def test_a_bad_or_huge_factor_cannot_shrink_or_unbound_a_timeout(monkeypatch):
    for value, factor in (("0.1", 1.0), ("junk", 1.0), ("1000", pace.MAX_SLOWDOWN)):
        monkeypatch.setenv(pace.ENV, value)
        assert pace.slowdown() == factor
