"""Config fuzzing over the schema: a valid DistillConfig or a ConfigError, never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kagglekd.__main__ import main
from kagglekd.config import ALIASES, DistillConfig
from kagglekd.errors import ConfigError

KEYS = list(DistillConfig.fields()) + list(ALIASES) + ["total_steps", "learning_rat", "", "__x", "α"]
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# Values near each field's valid range, so fuzzing also produces configs that are valid.
PLAUSIBLE = st.one_of(
    st.integers(-3, 5000),
    st.floats(-1.0, 2.0),
    st.sampled_from(["cosine", "linear", "jsd", "auto", "never"]),
    st.none(),
    st.booleans(),
)
CONFIGS = st.dictionaries(st.sampled_from(KEYS), st.one_of(PLAUSIBLE, JUNK), max_size=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_any_input_is_a_config_or_a_config_error(raw):
    try:
        config = DistillConfig.from_json(raw)
    except ConfigError as err:
        assert str(err)
    else:
        assert DistillConfig.from_json(json.loads(config.to_json())) == config


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(CONFIGS)
def test_cli_answers_bad_configs_with_exit_2_and_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "config.json"
    path.write_text(json.dumps(raw, allow_nan=True))
    try:
        DistillConfig.from_json(path)
    except ConfigError:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", "--config", str(path)])
        assert code == 2
        assert len([line for line in err.getvalue().splitlines() if line.strip()]) == 1
