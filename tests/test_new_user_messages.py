"""Messages a new user met: each names what is accepted, for the key that was wrong.

``batch_sizes`` names ``[1]`` (per-sample components) beside the dyadic sizes; a bad
``eta`` lists the threshold rules and says ``inf`` as TOML and Python write it;
``eta_min`` / ``eta_max`` are named as themselves, not as ``eta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipscope import Components
from clipscope.config import check_setting, load_config
from clipscope.engine import probe
from clipscope.errors import ConfigError


@pytest.mark.parametrize("sizes", [[0], [1, 2], [4, 12]])
def test_bad_batch_sizes_name_per_sample_components_and_the_dyadic_sizes(sizes):
    comps = Components.from_tensors(torch.randn(16, 3), torch.randint(0, 2, (16,)), batch_size=4)
    with pytest.raises(ValueError, match=r"\[1\] \(per-sample components.*batch size 4 times"):
        probe(nn.Linear(3, 2), F.cross_entropy, comps, batch_sizes=sizes)


@pytest.mark.parametrize(
    "value,hint",
    [("Descent-safe", "did you mean 'descent-safe'"), ("AUTOCLIP", "did you mean 'autoclip'"),
     ("descent_safe", "did you mean 'descent-safe'"), (-1, "")],
)  # fmt: skip
def test_a_bad_eta_lists_the_rules_and_says_inf_for_toml_and_python(value, hint):
    with pytest.raises(ConfigError) as err:
        check_setting("eta", value)
    message = str(err.value)
    assert "'descent-safe' or 'autoclip'" in message
    assert "TOML: inf" in message and "math.inf" in message
    assert hint in message


@pytest.mark.parametrize("key", ["eta_min", "eta_max", "zhang_gamma"])
def test_the_bounds_are_named_as_themselves(key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*\({key} must be a number > 0") as err:
        check_setting(key, -1)
    assert "eta must" not in str(err.value) and "threshold rule" not in str(err.value)


def test_the_toml_config_gets_the_same_message(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('task = "toy"\neta = "Descent-safe"\n')
    with pytest.raises(ConfigError, match=r"did you mean 'descent-safe'.*"):
        load_config(path)
    path.write_text('task = "toy"\neta = "descent-safe"\neta_min = -1.0\n')
    with pytest.raises(ConfigError, match=r"\(eta_min must be a number > 0 or inf \(TOML: inf"):
        load_config(path)


def test_per_sample_on_a_token_stream_says_how_a_stateless_model_is_served():
    """Per-sample components of a token stream: the refusal says how a GPT is served.

    A new user's trial: ``probe --config <gpt config> --per-sample`` said the components
    "carry a state", while docs/training.md says the GPT keeps none. The refusal now says
    what the stream is and how a stateless model is probed per sample.
    """
    from clipscope.components import SequentialComponents
    from clipscope.models import GPTLM

    comps = SequentialComponents.from_tokens(torch.arange(64) % 11, batch_size=2, bptt=4)
    model = GPTLM(vocab=11, n_layer=1, n_head=1, d_model=8, context=4)

    def loss(out, y):
        return F.cross_entropy(out[0].reshape(-1, 11), y.reshape(-1))

    with pytest.raises(ValueError, match=r"windows of a token stream.*model\.transformer"):
        probe(model, loss, comps, batch_sizes=[1])
