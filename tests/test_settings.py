"""Settings are checked before any work: unknown names with close matches, ranges, the words a
setting takes, and RecBole settings that ST2SI does not use."""


import pytest
import torch

from recbole_st2si.command_line import parse_overrides
from recbole_st2si.errors import UserInputError
from recbole_st2si.feature_cache import CACHE_DTYPES, cache_dtype
from recbole_st2si import precision
from recbole_st2si.precision import autocast_dtype
from recbole_st2si.model import ST2SI
from recbole_st2si.settings import CHOICES, model_rules
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
        ({"train_stage": "ful"}, "train_stage must be one of auto, full, ilp, top, lora, pretrain"),
        ({"feature_cache_storage": "fp16"}, "feature_cache_storage must be one of bf16, fp32, got 'fp16'"),
        ({"learnig_rate": 1e-3}, "unknown setting learnig_rate (from the command line or config_dict); did you mean learning_rate"),
        ({"resume": True}, "unknown setting resume (from the command line or config_dict)"),
        ({"topk": [0]}, "topk must be a positive integer"),
        ({"ilp_chunk_size": -1}, "ilp_chunk_size must be an integer >= 0, got -1"),
        ({"ilp_chunk_size": 1.5}, "ilp_chunk_size must be an integer >= 0, got 1.5"),
        ({"feature_batch_tokens": 0}, "feature_batch_tokens must be an integer >= 1, got 0"),
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


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("train_window", "sometimes", "train_window must be one of all, random, full, got 'sometimes'"),
        ("train_stage", "frozen", "train_stage must be one of auto, full, ilp, top, lora, pretrain, got 'frozen'"),
        ("mixed_precision", "fp8", "mixed_precision must be one of bf16, fp16, no, got 'fp8'"),
        ("feature_cache_dtype", "fp16", "feature_cache_dtype must be one of auto, bf16, fp32, got 'fp16'"),
        ("feature_cache_storage", "fp16", "feature_cache_storage must be one of bf16, fp32, got 'fp16'"),
    ],
)
def test_a_word_outside_a_settings_choices_is_refused_with_the_choices(make_config, name, value, message):
    with pytest.raises(UserInputError) as caught:
        make_config(**{name: value})
    assert str(caught.value) == message


def test_every_choice_is_one_the_code_reads():
    """The words check_settings lets through are the ones the code maps (it no longer checks them)."""
    choices = model_rules(CHOICES, ST2SI)
    assert set(choices["train_stage"]) == {"auto", *ST2SI.train_stages}
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
    assert {word: autocast_dtype(word, torch.device("cuda")) for word in choices["mixed_precision"]} == expected
    assert {word: CACHE_DTYPES[word] for word in choices["feature_cache_storage"]} == {"bf16": torch.bfloat16, "fp32": torch.float32}
    frozen_pass = {word: cache_dtype(word, torch.device("cpu")) for word in choices["feature_cache_dtype"]}
    assert frozen_pass["bf16"] == torch.bfloat16 and frozen_pass["fp32"] == torch.float32
    assert frozen_pass["auto"] in (torch.bfloat16, torch.float32)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("learner", "sgd", "learner is not used by ST2SI (it trains with AdamW): remove it"),
        ("learner", "adamw", "learner is not used by ST2SI (it trains with AdamW): remove it"),
        ("enable_amp", True, "enable_amp is not used by ST2SI (it uses mixed_precision): remove it"),
        ("enable_scaler", False, "enable_scaler is not used by ST2SI (it uses mixed_precision): remove it"),
        ("loss_type", "BPR", "loss_type must be CE for ST2SI (it trains with cross-entropy over all items), got 'BPR'"),
        ("train_neg_sample_args", {"distribution": "uniform", "sample_num": 1},
         "train_neg_sample_args must be None for ST2SI (it trains with cross-entropy over all items, without "
         "negatives), got {'distribution': 'uniform', 'sample_num': 1, 'alpha': 1.0, 'dynamic': False, "
         "'candidate_num': 0}"),  # as RecBole completes it
    ],
)
def test_a_recbole_setting_st2si_does_not_use_is_refused(settings, tmp_path, name, value, message):
    """Refused in one line whether given in ``config_dict`` (the command line) or in a config file."""
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(f"{name}: {value!r}\n" if isinstance(value, str) else f"{name}: {value}\n")
    for files, entries in (([], settings(**{name: value})), ([str(config_file)], settings())):
        with pytest.raises(UserInputError) as caught:
            create_config("ST2SI", "tiny", files, entries)
        assert str(caught.value) == message


def test_recboles_defaults_and_agreeing_values_are_not_refused(make_config, settings):
    """RecBole's own defaults (learner adam, enable_amp off, ...) are no user's choice; loss_type CE
    and no negative sampling agree with ST2SI; the other models keep these settings."""
    config = make_config()
    assert config["learner"] == "adam" and config["enable_amp"] is False and config["enable_scaler"] is False
    assert make_config(loss_type="CE", train_neg_sample_args=None, ilp_chunk_size=None)["loss_type"] == "CE"
    sasrec = create_config("SASRec", "tiny", config_dict=settings(learner="sgd", enable_amp=False, loss_type="CE"))
    assert sasrec["learner"] == "sgd"


def test_st2sis_words_are_not_applied_to_another_models_setting_of_the_same_name():
    """RecBole's S3Rec has a train_stage of its own: pretrain, then finetune."""
    config = create_config("S3Rec", "tiny", config_dict={"data_path": str(DATA_DIR), "train_stage": "finetune"})
    assert config["train_stage"] == "finetune"


def test_a_command_line_none_agrees_with_st2si(settings):
    entries = {**settings(), **parse_overrides(["--train_neg_sample_args=None", "--loss_type=CE"])}
    assert create_config("ST2SI", "tiny", config_dict=entries)["loss_type"] == "CE"


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp16", cpu) is None and autocast_dtype("no", cpu) is None
