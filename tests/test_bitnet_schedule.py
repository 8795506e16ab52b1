"""Lambda warmup values, the shared controller, validation messages and checkpoint round trips."""

import math

import pytest

from training.bitnet import LambdaController, LambdaWarmup


def test_linear_warmup_values():
    s = LambdaWarmup(1000)
    assert [s.value(t) for t in (0, 250, 500, 999, 1000, 5000)] == [0.0, 0.25, 0.5, 0.999, 1.0, 1.0]


def test_cosine_warmup_values():
    s = LambdaWarmup(100, schedule="cosine")
    assert s.value(0) == 0.0
    assert s.value(50) == pytest.approx(0.5)
    assert s.value(25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert s.value(100) == 1.0 and s.value(101) == 1.0


def test_zero_warmup_is_always_fully_quantised():
    assert LambdaWarmup(0).value(0) == 1.0
    assert LambdaWarmup(0, "cosine").value(7) == 1.0


def test_warmup_rejects_bad_config_with_message():
    with pytest.raises(ValueError, match=r"^schedule must be one of \('linear', 'cosine'\), got 'exp'$"):
        LambdaWarmup(10, schedule="exp")
    with pytest.raises(ValueError, match=r"^warmup_steps must be an integer >= 0, got -5$"):
        LambdaWarmup(-5)
    with pytest.raises(ValueError, match=r"^step must be an integer >= 0, got -1$"):
        LambdaWarmup(10).value(-1)


def test_warmup_state_dict_round_trip():
    restored = LambdaWarmup(1)
    restored.load_state_dict(LambdaWarmup(300, "cosine").state_dict())
    assert (restored.warmup_steps, restored.schedule) == (300, "cosine")


def test_controller_follows_schedule():
    ctrl = LambdaController(LambdaWarmup(10))
    assert ctrl.value == 0.0 and ctrl.step == 0
    assert ctrl.set_step(4) == pytest.approx(0.4)
    assert ctrl.value == pytest.approx(0.4) and ctrl.step == 4
    assert ctrl.set_step(20) == 1.0


def test_controller_without_schedule_holds_its_value():
    ctrl = LambdaController(value=0.25)
    ctrl.set_step(100)
    assert ctrl.value == 0.25 and ctrl.step == 100
    ctrl.set_value(0.75)
    assert ctrl.value == 0.75
    ctrl.value = 0
    assert ctrl.value == 0.0


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "high"])
def test_controller_rejects_lambda_outside_unit_interval(bad):
    ctrl = LambdaController()
    with pytest.raises(ValueError, match=r"^lambda must be in \[0, 1\], got "):
        ctrl.set_value(bad)
    with pytest.raises(ValueError, match=r"^lambda must be in \[0, 1\], got "):
        ctrl.value = bad
    assert ctrl.value == 1.0


def test_lambda_error_message_names_the_value():
    with pytest.raises(ValueError) as err:
        LambdaController().set_value(1.5)
    assert str(err.value) == "lambda must be in [0, 1], got 1.5"
    with pytest.raises(ValueError, match=r"^lambda must be in \[0, 1\], got 2$"):
        LambdaController(value=2)


def test_controller_state_dict_round_trip():
    ctrl = LambdaController(LambdaWarmup(100))
    ctrl.set_step(30)
    resumed = LambdaController(LambdaWarmup(100))
    resumed.load_state_dict(ctrl.state_dict())
    assert resumed.step == 30 and resumed.value == pytest.approx(0.3)
    assert ctrl.state_dict() == {"step": 30, "value": pytest.approx(0.3)}
