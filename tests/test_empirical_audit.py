"""`fedfuse audit --empirical`: canaries through the real DP-SGD round, lower bound vs the claimed epsilon."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import synthetic
from common.errors import PrivacyParameterError
from common.model.multimodal import ModelConfig
from common.privacy import empirical_audit
from common.privacy.audit import EXIT_EMPIRICAL
from common.privacy.empirical_audit import (
    CANARY_CLASS,
    CANARY_GRAD_SCALE,
    CanaryModel,
    EmpiricalAuditConfig,
    build_audit_data,
    canary_units,
    format_empirical_report,
    step_gradients,
)
from common.privacy.training import RoundResult, train_round
from fedfuse.cli import build_parser, main

CONFIG = ModelConfig(embed_dim=8, hidden_dim=8)


@pytest.fixture(scope="module")
def small():
    """A CanaryModel with 4 canaries (0 and 2 included) and its data: 6 real rows, 4 canary slots, blanks."""
    real = synthetic.generate(6, seed=3)
    included = np.array([True, False, True, False])
    data = build_audit_data(real, included, steps_per_epoch=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CanaryModel(real.schema, CONFIG, 4, max_grad_norm=1.0)
        with torch.no_grad():
            model.canary.weight.normal_()  # non-zero weights: the canary gradient must not depend on them
    return model, data


def grads_of_row(model, data, row):
    """Gradient of one row's loss on (real model parameters, canary weight (m,))."""
    model.zero_grad(set_to_none=True)
    inputs = {n: x[row : row + 1] for n, x in data.inputs.items()}
    F.cross_entropy(model(inputs, data.mask[row : row + 1]), data.labels[row : row + 1]).backward()
    real = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.model.parameters()])
    return real, model.canary.weight.grad[0].clone()


def test_audit_data_size_and_layout_do_not_depend_on_which_canaries_are_included():
    # Prepare
    real = synthetic.generate(7, seed=1)
    # Execute
    a = build_audit_data(real, np.array([True] * 5), steps_per_epoch=4)
    b = build_audit_data(real, np.array([False, True, False, False, False]), steps_per_epoch=4)
    # Assert: 7 + 5 = 12 rows -> batch 3, exactly 4 steps per epoch, whatever is included
    assert len(a) == len(b) == 12
    assert a.inputs["canary"].sum() == 5 and b.inputs["canary"].sum() == 1
    assert torch.equal(b.inputs["canary"][8], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))  # slot of canary 1
    assert torch.equal(a.mask[:7, -1], torch.zeros(7, dtype=torch.bool)) and a.mask[7:, -1].all()
    assert not a.mask[7:, :-1].any()


def test_a_canary_row_moves_only_its_own_coordinate_by_a_fixed_gradient(small):
    model, data = small
    k = len(synthetic.LABELS)
    for slot, canary in ((6, 0), (8, 2)):
        # Execute
        real, canary_grad = grads_of_row(model, data, slot)
        # Assert: nothing on the real model, -s (1 - 1/K) on e_i, whatever the canary weights are
        expected = torch.zeros(4)
        expected[canary] = -CANARY_GRAD_SCALE * (1 - 1 / k)
        assert torch.count_nonzero(real) == 0
        assert torch.allclose(canary_grad, expected)
    assert data.labels[6] == CANARY_CLASS


def test_real_rows_and_blanks_never_touch_the_canary_block(small):
    model, data = small
    for row in range(6):
        real, canary_grad = grads_of_row(model, data, row)
        assert torch.count_nonzero(canary_grad) == 0 and torch.count_nonzero(real) > 0
    for blank in (7, 9, 10):
        real, canary_grad = grads_of_row(model, data, blank)
        assert torch.count_nonzero(canary_grad) == 0 and torch.count_nonzero(real) == 0


def test_real_rows_get_the_real_models_logits(small):
    model, data = small
    real_names = model.model.schema.names
    logits = model(data.inputs, data.mask)[:6]
    expected = model.model({n: data.inputs[n][:6] for n in real_names}, data.mask[:6, :-1])
    assert torch.allclose(logits, expected, atol=1e-6)  # equal up to batch-size-dependent rounding


def test_step_gradients_undo_sgd_momentum():
    # Prepare: PyTorch SGD with momentum on known gradients, iterates recorded before each step
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.5)
    grads = torch.tensor([[1.0, 0.0, -2.0], [0.5, 3.0, 0.0], [0.0, -1.0, 1.0], [2.0, 2.0, 2.0]])
    trace = []
    for g in grads:
        trace.append(w.detach().clone())
        w.grad = g.clone()
        opt.step()
    trace.append(w.detach().clone())
    # Execute / Assert
    assert np.allclose(step_gradients(trace, lr=0.5, momentum=0.5), grads.numpy(), atol=1e-6)


def test_canary_units_divide_by_the_expected_batch_training_uses():
    # q = 15 / 22 of 22 records: the optimizer divides the noised sum by q * 22 (a float just below 15), which
    # int() would truncate to 14; the units must undo exactly what training did
    q, n, lr, C = 15 / 22, 22, 0.5, 2.0
    result = RoundResult(True, 1.0, 1e-5, 1.0, q, 3, C, n, 0.0, 0.0)
    units = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (T, m): canary i sampled at step t
    trace = [torch.zeros(2)]
    for u in units:  # SGD without momentum on the gradient -C u / (q N)
        trace.append(trace[-1] - lr * (-C * u / (q * n)))
    x = canary_units(trace, result, lr=lr, momentum=0.0, max_grad_norm=C)
    np.testing.assert_allclose(x, units.double().numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "bad", [dict(sample_rate=0.03), dict(steps=210), dict(epsilon=float("inf")), dict(canaries=0), dict(delta=0.0)]
)
def test_bad_parameters_are_refused(bad):
    with pytest.raises(PrivacyParameterError):
        EmpiricalAuditConfig(**bad)


def test_a_correct_run_gives_a_lower_bound_below_the_claimed_epsilon(capsys):
    # Execute: the default audit (1000 canaries, 200 steps at q = 0.02) of a run that claims ε = 1
    status = main(["audit", "--empirical", "--epsilon", "1", "--seed", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    # Assert: passes; the iterates show the calibrated noise
    assert status == 0 and report["passed"] is True
    assert report["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert report["epsilon_lb"] < report["claimed_epsilon"]
    assert (report["num_canaries"], report["steps"], report["sample_rate"]) == (1000, 200, 0.02)
    assert report["measured_noise_multiplier"] == pytest.approx(report["noise_multiplier"], rel=0.05)


def test_a_run_with_a_quarter_of_the_noise_is_caught(monkeypatch, capsys):
    # Prepare: the same round, adding a quarter of the calibrated noise (test-only keyword of train_round)
    monkeypatch.setattr(empirical_audit, "train_round", functools.partial(train_round, _noise_scale=0.25))
    # Execute
    status = main(["audit", "--empirical", "--epsilon", "1", "--seed", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    # Assert: the lower bound exceeds the claim (measured 3.05-3.61 over 8 runs), the exit status and text say so
    assert status == EXIT_EMPIRICAL and report["passed"] is False
    assert report["epsilon_lb"] > 1.5 * report["claimed_epsilon"]
    assert report["measured_noise_multiplier"] == pytest.approx(report["noise_multiplier"] / 4, rel=0.05)
    assert "result: FAILED" in format_empirical_report(report)


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["audit", "--empirical", str(tmp_path)]) == 2  # a run of its own: no PATH
    assert "drop PATH" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--epsilon", "1"]) == 2  # --epsilon needs --empirical
    assert main(["audit"]) == 2
    assert main(["audit", "--empirical", "--sample-rate", "0.03"]) == 2
    with pytest.raises(SystemExit) as exc:  # the test-only noise reduction is not an option
        main(["audit", "--empirical", "--noise-scale", "0.25"])
    assert exc.value.code == 2


def test_help_documents_the_empirical_exit_status():
    parser, _ = build_parser(["audit"])
    text = parser._subparsers._group_actions[0].choices["audit"].format_help()
    assert f"{EXIT_EMPIRICAL}  (--empirical) the empirical lower bound exceeds the claimed epsilon" in text
    assert "--noise" not in text
