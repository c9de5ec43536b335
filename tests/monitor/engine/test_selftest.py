"""The start-up self-test's comparison: per readout column, within atol + rtol * max|reference|."""

from __future__ import annotations

from monitor.engine.selftest import compare_readouts

REFERENCE = [{"p": 2.0, "q": 0.0}, {"p": -4.0, "q": 0.5}]


def test_agreement_within_the_bfloat16_tolerance_passes() -> None:
    tested = [{"p": 2.1, "q": 0.01}, {"p": -4.15, "q": 0.5}]  # p: 0.15 <= 0.05 + 0.05 * 4
    report = compare_readouts(tested, REFERENCE)
    assert report.ok and report.tokens == 2
    p = report.columns[0]
    assert (p.name, round(p.max_abs_diff, 6), p.scale, round(p.tolerance, 6)) == ("p", 0.15, 4.0, 0.25)


def test_a_column_out_of_tolerance_fails_and_is_named() -> None:
    tested = [{"p": 2.0, "q": 0.3}, {"p": -4.0, "q": 0.5}]  # q: 0.3 > 0.05 + 0.05 * 0.5
    report = compare_readouts(tested, REFERENCE)
    assert not report.ok
    assert "1 of 2 readouts disagree" in report.message() and "(q)" in report.message()
    assert "NO" in report.table().splitlines()[2]


def test_a_different_token_count_or_a_missing_readout_fails() -> None:
    assert "1 tokens against the reference's 2" in compare_readouts(REFERENCE[:1], REFERENCE).message()
    assert "missing from the tested engine: q" in compare_readouts([{"p": 2.0}, {"p": -4.0}], REFERENCE).message()
