import pytest

from slimtune.eval.metrics import bleu, chrf

REFS = [
    "All human beings are born free and equal in dignity and rights.",
    "Everyone has the right to life, liberty and security of person.",
]


def test_identical_is_100():
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert chrf(REFS, REFS) == pytest.approx(100.0)


def test_unrelated_is_low():
    hyps = ["qzx vvv kkk plonk", "zzz yyy wibble frob"]
    assert bleu(hyps, REFS) < 5.0
    assert chrf(hyps, REFS) < 15.0


def test_partial_is_in_between():
    hyps = ["All human beings are born free.", "Everyone has the right to life."]
    assert 5.0 < bleu(hyps, REFS) < 100.0
    assert 15.0 < chrf(hyps, REFS) < 100.0


def test_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError):
        bleu(["a"], REFS)
    with pytest.raises(ValueError):
        chrf([], [])
