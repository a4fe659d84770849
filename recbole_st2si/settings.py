"""Every setting checked before any work: unknown names, values outside their range or choices,
and settings RecBole reads that the model does not use.

RecBole accepts any ``--key=value``, YAML entry or ``config_dict`` key and silently ignores the ones
no code reads, and it takes any value: ``learning_rate: -1`` trains by gradient ascent. The known
names are RecBole's own (its ``properties`` files for the model, the datasets and the quick-start
presets, and its argument lists), the plugin's defaults (``properties/``, ``dataset_configs/``) and
the distributed settings. Command-line settings reach the config as ``config_dict`` (see
:mod:`recbole_st2si.command_line`), so both are reported as one source.
"""

import difflib
import numbers
from functools import lru_cache
from pathlib import Path

import recbole
import yaml
from recbole.utils import argument_list

from recbole_st2si.config import DATASET_DEFAULTS_DIR, MODEL_DEFAULTS_DIR, OVERALL_DEFAULTS
from recbole_st2si.errors import UserInputError

RECBOLE_PROPERTIES = Path(recbole.__file__).resolve().parent / "properties"
DISTRIBUTED_SETTINGS = {"nproc", "world_size", "ip", "port", "offset", "local_rank"}
NOT_SETTINGS_FILES = {"url.yaml", "kg_url.yaml"}  # dataset download addresses

# name: (lowest, whether the lowest is allowed, highest or None, integer)
RANGES = {
    "learning_rate": (0, False, None, False),
    "ilp_learning_rate": (0, False, None, False),
    "frozen_ilp_learning_rate": (0, False, None, False),
    "weight_decay": (0, True, None, False),
    "epochs": (1, True, None, True),
    "train_batch_size": (1, True, None, True),
    "eval_batch_size": (1, True, None, True),
    "feature_batch_tokens": (1, True, None, True),
    "gradient_accumulation_steps": (1, True, None, True),
    "stopping_step": (1, True, None, True),
    "warmup_steps": (0, True, None, True),
    "MAX_ITEM_LIST_LENGTH": (1, True, None, True),
    "max_seq_tokens": (2, True, None, True),
    "max_attr_tokens": (1, True, None, True),
    "lora_r": (1, True, None, True),
    "top_layers": (0, True, None, True),
    "lora_alpha": (0, False, None, False),
    "n_layers": (1, True, None, True),
    "n_heads": (1, True, None, True),
    "num_layers": (1, True, None, True),
    "hidden_size": (1, True, None, True),
    "inner_size": (1, True, None, True),
    "embedding_size": (1, True, None, True),
    "pretrain_epochs": (1, True, None, True),
    "save_step": (1, True, None, True),
    "worker": (0, True, None, True),
    "mask_ratio": (0, True, 1, False),
    "ft_ratio": (0, True, 1, False),
    "topk": (1, True, None, True),
    "ilp_chunk_size": (0, True, None, True),
}
PROBABILITY_MARKERS = ("dropout", "_prob")  # hidden_dropout_prob, dropout_prob, lora_dropout, ...
MAY_BE_UNSET = {"ilp_learning_rate", "ilp_chunk_size"}  # ~ = derived from other settings, or no limit

# The words a model's settings take, for the model and its subclasses (RecBole's S3Rec has a
# train_stage of its own): model: {name: words}. The code that reads them relies on this check.
CHOICES = {
    "ST2SI": {
        "train_stage": ("auto", "full", "ilp", "top", "lora", "pretrain"),
        "train_window": ("all", "random", "full"),
        "mixed_precision": ("bf16", "fp16", "no"),
        "feature_cache_dtype": ("auto", "bf16", "fp32"),
        "feature_cache_storage": ("bf16", "fp32"),
        "compile": ("auto", True, False),
    },
}

# Settings RecBole reads that a model (or a subclass of it) does not, refused where the user gives
# them: model: {name: (the values that agree with the model, or () for none, what the model does)}.
NOT_USED = {
    "ST2SI": {
        "learner": ((), "it trains with AdamW"),
        "enable_amp": ((), "it uses mixed_precision"),
        "enable_scaler": ((), "it uses mixed_precision"),
        "loss_type": (("CE",), "it trains with cross-entropy over all items"),
        "train_neg_sample_args": ((None,), "it trains with cross-entropy over all items, without negatives"),
    },
}


def _yaml_keys(path):
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    return set(loaded) if isinstance(loaded, dict) else set()


@lru_cache(maxsize=None)
def known_settings(model_name):
    """Every setting name that RecBole or the plugin reads for ``model_name``."""
    names = set(DISTRIBUTED_SETTINGS)
    for group in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        names |= set(getattr(argument_list, group))
    files = [RECBOLE_PROPERTIES / "overall.yaml", RECBOLE_PROPERTIES / "model" / f"{model_name}.yaml"]
    files += sorted((RECBOLE_PROPERTIES / "dataset").glob("*.yaml"))
    files += sorted((RECBOLE_PROPERTIES / "quick_start_config").glob("*.yaml"))
    files += [OVERALL_DEFAULTS, *sorted(MODEL_DEFAULTS_DIR.glob("*.yaml")), *sorted(DATASET_DEFAULTS_DIR.glob("*.yaml"))]
    for path in files:
        if path.is_file() and path.name not in NOT_SETTINGS_FILES:
            names |= _yaml_keys(path)
    return frozenset(names)


@lru_cache(maxsize=None)
def boolean_settings():
    """Settings whose default, in RecBole's or the plugin's defaults, is True or False."""
    names = set()
    for path in [RECBOLE_PROPERTIES / "overall.yaml", OVERALL_DEFAULTS, *sorted(MODEL_DEFAULTS_DIR.glob("*.yaml"))]:
        loaded = yaml.safe_load(path.read_text()) or {}
        names |= {name for name, value in loaded.items() if isinstance(value, bool)}
    return frozenset(names)


def unknown_setting_problems(config):
    """One line per setting given by the user (file, ``config_dict``, command line) that nothing reads."""
    settings_known = known_settings(config["model"])
    sources = (
        ("the command line or config_dict", config.variable_config_dict),
        ("a config file", config.file_config_dict),
    )
    problems, seen = [], set()
    for source, settings in sources:
        for name in settings:
            if name in settings_known or name in seen:
                continue
            seen.add(name)
            close = difflib.get_close_matches(name, settings_known, n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.append(f"unknown setting {name} (from {source}){hint}")
    return problems


def _range_text(lowest, inclusive, highest):
    if highest is not None:
        return f"in [{lowest}, {highest}]"
    return f">= {lowest}" if inclusive else f"> {lowest}"


def _value_problem(name, value, lowest, inclusive, highest, integer):
    kind = "an integer" if integer else "a number"
    expected = f"{name} must be {kind} {_range_text(lowest, inclusive, highest)}"
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        is_number = isinstance(item, numbers.Real) and not isinstance(item, bool)
        if not is_number or (integer and item != int(item)):
            return f"{expected}, got {value!r}"
        if item < lowest or (item == lowest and not inclusive) or (highest is not None and item > highest):
            return f"{expected}, got {value!r}"
    return None


def user_settings(config):
    """The settings the user gave, by name: files first, then the command line or ``config_dict``."""
    return {**config.file_config_dict, **config.variable_config_dict}


def model_rules(table, model_class):
    """The entries of ``table`` (:data:`CHOICES`, :data:`NOT_USED`) for the model's class and its
    base classes, a subclass's entry first."""
    rules = {}
    for klass in reversed(model_class.__mro__):
        rules.update(table.get(klass.__name__, {}))
    return rules


def not_used_problems(config, model_class):
    """One line per setting the user gave that the model (by its class or a base class) ignores."""
    problems, given = [], user_settings(config)
    for name, (agreeing, instead) in model_rules(NOT_USED, model_class).items():
        if name not in given or (agreeing and given[name] in agreeing):
            continue
        if agreeing:
            allowed = " or ".join(str(value) for value in agreeing)
            problems.append(f"{name} must be {allowed} for {config['model']} ({instead}), got {given[name]!r}")
        else:
            problems.append(f"{name} is not used by {config['model']} ({instead}): remove it")
    return problems


def value_problems(config, model_class):
    """One line per numeric setting outside its range (learning rates > 0, epochs >= 1, ...), per
    boolean that is not one, and per word outside the model's :data:`CHOICES`."""
    problems = []
    for name in sorted(config.final_config_dict):
        value = config[name]
        if name in RANGES:
            limits = RANGES[name]
        elif any(marker in name for marker in PROBABILITY_MARKERS) and value is not None:
            limits = (0, True, 1, False)
        else:
            continue
        if value is None and name in MAY_BE_UNSET:
            continue
        problem = _value_problem(name, value, *limits)
        if problem:
            problems.append(problem)
    for name in sorted(boolean_settings() & set(config.final_config_dict)):
        if not isinstance(config[name], bool):
            problems.append(f"{name} must be True or False, got {config[name]!r}")
    for name, choices in sorted(model_rules(CHOICES, model_class).items()):
        if config[name] not in choices:
            problems.append(f"{name} must be one of {', '.join(map(str, choices))}, got {config[name]!r}")
    return problems


def check_settings(config, model_class):
    """Raise one :class:`UserInputError` listing, one line each, every unknown or out-of-range
    setting, and every setting the user gave that the model does not use."""
    problems = unknown_setting_problems(config) + value_problems(config, model_class) + not_used_problems(config, model_class)
    if problems:
        raise UserInputError("\n".join(problems))
