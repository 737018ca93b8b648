"""benchmarks/ab_step.py: its variant parsing, environment handling and statistics."""

import os

import numpy as np
import pytest

from benchmarks import ab_step


def test_variants_parse_to_environment_settings():
    assert ab_step.parse_variant("base") == {}
    assert ab_step.parse_variant("A=1, B=x") == {"A": "1", "B": "x"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ab_step.parse_variant("JAXCL_CPU_TUNING")


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("AB_STEP_KEPT", "before")
    monkeypatch.delenv("AB_STEP_NEW", raising=False)
    with ab_step.environment({"AB_STEP_KEPT": "during", "AB_STEP_NEW": "1"}):
        assert os.environ["AB_STEP_KEPT"] == "during"
        assert os.environ["AB_STEP_NEW"] == "1"
    assert os.environ["AB_STEP_KEPT"] == "before"
    assert "AB_STEP_NEW" not in os.environ


def test_difference_is_the_mean_paired_difference_with_its_standard_error():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    times = reference + np.array([0.1, 0.3, 0.1, 0.3])
    mean, error = ab_step.difference_summary(times, reference)
    assert mean == pytest.approx(0.2)
    assert error == pytest.approx(np.std([0.1, 0.3, 0.1, 0.3], ddof=1) / 2)
    assert ab_step.difference_summary(np.array([2.0]), np.array([1.5])) == (0.5, 0.0)
