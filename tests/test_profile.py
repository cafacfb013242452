"""`profile_steps`: a jax.profiler trace of the chosen steps in workdir/profile, none when off, bad values refused."""

import gzip
import json

import pytest
from test_ema import toy_config, toy_task, train

from onepfrac_jax.config import ConfigError


def traces(workdir):
    return sorted((workdir / "profile").glob("plugins/profile/*/*.trace.json.gz"))


def test_the_chosen_steps_are_traced_into_workdir_profile(tmp_path):
    result = train(toy_task(), toy_config(profile_steps="2,3", ema_decay=0.0), tmp_path / "run")
    assert result.step == 6
    [trace] = traces(tmp_path / "run")
    assert list(trace.parent.glob("*.xplane.pb"))  # what TensorBoard's profile plugin reads
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    # the jitted update step ran inside the trace
    assert any("train_step" in str(e.get("name", "")) for e in events)


def test_no_profile_when_off(tmp_path):
    train(toy_task(), toy_config(ema_decay=0.0), tmp_path / "run")
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize(("value", "message"), [("3", "must be two step numbers"), ("a,b", "must be two step"),
                                                ("4,2", "need 1 ≤ A ≤ B"), ("0,2", "need 1 ≤ A ≤ B")])
def test_bad_profile_steps_are_one_error_and_write_nothing(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        train(toy_task(), toy_config(profile_steps=value), tmp_path / "run")
    assert not (tmp_path / "run").exists()
