import json
import subprocess
import sys

import numpy as np
import pytest

from hw2jax import cli


def test_theory_json_reports_consistent_numbers():
    out = subprocess.run(
        [sys.executable, "-m", "hw2jax.cli", "theory", "--json", "--lengths", "32,64"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)

    rec = report["recurrence"]
    x = rec["x"]
    h, expected = 0.0, []
    for v in x:
        h = v - h
        expected.append(h)
    assert rec["h"] == expected
    assert rec["closed_form_h_T"] == expected[-1] == sum(x[1::2]) - sum(x[0::2])

    sa = report["self_attention"]
    beta = sa["beta"]
    np.testing.assert_allclose(sa["norms"], [np.sqrt(2) * beta, beta, np.sqrt(2) * beta], rtol=1e-6)
    np.testing.assert_allclose(sa["weights"], np.eye(3), atol=1e-6)
    assert sa["max_relative_copy_error"] < 1e-5

    rows = report["attention_timing"]["rows"]
    assert [r["T"] for r in rows] == [32, 64]
    assert all(r["softmax_ms"] > 0 and r["linear_ms"] > 0 for r in rows)


def test_theory_text_names_each_part(capsys):
    assert cli.main(["theory", "--lengths", "16"]) == 0
    text = capsys.readouterr().out
    for phrase in ("Scalar RNN", "Weightless self-attention", "Softmax vs linear"):
        assert phrase in text


def test_bad_lengths_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["theory", "--lengths", "abc"])
    assert exc.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
