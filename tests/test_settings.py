"""Settings are checked before any work: unknown names with close matches, and ranges."""

import pytest

from recbole_st2si.command_line import parse_overrides
from recbole_st2si.errors import UserInputError
from recbole_st2si.utils import create_config

from .conftest import DATA_DIR

BASELINES = ["SASRec", "GRU4Rec", "BERT4Rec", "FDSA", "S3Rec"]


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"learning_rate": -1}, "learning_rate must be a number > 0, got -1"),
        ({"ilp_learning_rate": 0.0}, "ilp_learning_rate must be a number > 0, got 0.0"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5"),
        ({"train_batch_size": 0}, "train_batch_size must be an integer >= 1, got 0"),
        ({"eval_batch_size": -4}, "eval_batch_size must be an integer >= 1, got -4"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
        ({"lora_dropout": 1.5}, "lora_dropout must be a number in [0, 1], got 1.5"),
        ({"learning_rate": "fast"}, "learning_rate must be a number > 0, got 'fast'"),
        ({"multi_query": "flase"}, "multi_query must be True or False, got 'flase'"),
        ({"train_window": "rand"}, "train_window must be one of all, random, full, got 'rand'"),
        ({"train_stage": "ful"}, "train_stage must be one of auto, full, ilp, lora, pretrain"),
        ({"feature_cache_storage": "fp16"}, "feature_cache_storage must be one of bf16, fp32, got 'fp16'"),
        ({"learnig_rate": 1e-3}, "unknown setting learnig_rate (from the command line or config_dict); did you mean learning_rate"),
        ({"resume": True}, "unknown setting resume (from the command line or config_dict)"),
        ({"topk": [0]}, "topk must be a positive integer"),
    ],
)
def test_each_bad_setting_is_one_clear_line(make_config, entries, message):
    with pytest.raises(UserInputError) as caught:
        make_config(**entries)
    assert message in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_every_problem_is_listed_one_line_each(make_config):
    with pytest.raises(UserInputError) as caught:
        make_config(learning_rate=-1, epochs=0, hidden_dropout=0.1)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("unknown setting hidden_dropout")


def test_command_line_settings_are_checked(settings):
    """The entry points hand their leftover ``--key=value`` arguments to the config as ``config_dict``."""
    assert create_config("ST2SI", "tiny", config_dict={**settings(), **parse_overrides(["--epochs=3"])})["epochs"] == 3
    with pytest.raises(UserInputError, match=r"unknown setting epoch \(from the command line or config_dict\); did you mean epochs"):
        create_config("ST2SI", "tiny", config_dict={**settings(), **parse_overrides(["--epoch=2"])})


def test_a_setting_in_a_config_file_is_checked(settings, tmp_path):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("learning_rat: 0.001\n")
    with pytest.raises(UserInputError, match="unknown setting learning_rat \\(from a config file\\)"):
        create_config("ST2SI", "tiny", [str(config_file)], settings())


@pytest.mark.parametrize("model", BASELINES)
def test_recboles_baselines_accept_their_own_settings(model):
    """Every key of RecBole's model file, the plugin's defaults and the dataset config pass."""
    config = create_config(model, "tiny", config_dict={"data_path": str(DATA_DIR), "llm_path": "tiny-random",
                                                         "feature_cache_dir": "saved/cache", "epochs": 1})
    assert config["model"] == model


def test_model_settings_of_another_model_are_unknown(settings):
    with pytest.raises(UserInputError, match="unknown setting n_layers"):
        create_config("ST2SI", "tiny", config_dict=settings(n_layers=2))
