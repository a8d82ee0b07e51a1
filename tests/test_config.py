import pytest

import hae_fx
from hae_fx import HAEConfig, HAEConfigError
from hae_fx.policies import available


def test_defaults_are_valid_and_frozen():
    config = HAEConfig()
    assert config.policy in available()
    with pytest.raises(AttributeError):
        config.capacity = 1


def test_capacity_must_leave_room_beyond_sinks_and_window():
    with pytest.raises(HAEConfigError, match=r"capacity=20 is too small .* sinks \+ window \+ 1 = 4 \+ 16 \+ 1 = 21"):
        HAEConfig(policy="streaming", capacity=20, sinks=4, window=16)
    HAEConfig(policy="streaming", capacity=21, sinks=4, window=16)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(HAEConfigError, match=r"unknown eviction policy 'lru'; choose one of full, streaming"):
        HAEConfig(policy="lru")


@pytest.mark.parametrize("field, value, message", [
    ("capacity", -8, r"HAEConfig.capacity must be >= 1, got -8"),
    ("capacity", 0, r"HAEConfig.capacity must be >= 1, got 0"),
    ("sinks", -1, r"HAEConfig.sinks must be >= 0, got -1"),
    ("capacity", 12.5, r"HAEConfig.capacity must be an int, got float 12.5"),
    ("window", True, r"HAEConfig.window must be an int, got bool True"),
])
def test_fields_are_range_checked(field, value, message):
    with pytest.raises(HAEConfigError, match=message):
        HAEConfig(**{field: value})


def test_config_errors_are_value_errors():
    assert issubclass(HAEConfigError, ValueError)
    assert issubclass(HAEConfigError, hae_fx.HAEError)


def test_replace_revalidates():
    config = HAEConfig(policy="full", capacity=8)
    assert config.replace(capacity=16).capacity == 16
    with pytest.raises(HAEConfigError):
        config.replace(capacity=-1)
