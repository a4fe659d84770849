"""Glue between RecBole's factories and the plugin's classes: config, dataset, dataloaders, model."""

import os
from pathlib import Path

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.utils import get_model as recbole_get_model

from recbole_st2si.data.dataloader import ST2SITrainDataLoader
from recbole_st2si.data.dataset import ST2SIDataset
from recbole_st2si.data.prepare import main as prepare_main
from recbole_st2si.distributed import PROPERTIES_DIR, PluginConfig
from recbole_st2si.errors import UserInputError
from recbole_st2si.model import ST2SI
from recbole_st2si.model.st2si import resolve_auto_settings
from recbole_st2si.settings import check_settings

DATASET_CONFIG_DIR = PROPERTIES_DIR.parent / "dataset_configs"
PLUGIN_MODELS = {"ST2SI": ST2SI}


def get_model(model_name):
    """The plugin's model class for its own names, RecBole's for every other name."""
    if model_name in PLUGIN_MODELS:
        return PLUGIN_MODELS[model_name]
    try:
        return recbole_get_model(model_name)
    except (ValueError, ModuleNotFoundError):  # RecBole's last search place needs lightgbm and xgboost
        raise UserInputError(f"unknown model {model_name!r}: neither ST2SI nor a RecBole model") from None


def config_files_for(model_name, dataset_name, config_file_list=None):
    """The plugin's defaults (overall, model, dataset), then the user's files, later files winning."""
    defaults = [
        PROPERTIES_DIR / "overall.yaml",
        PROPERTIES_DIR / f"{model_name}.yaml",
        DATASET_CONFIG_DIR / f"{dataset_name}.yaml",
    ]
    files = [str(path) for path in defaults if path.is_file()]
    for user_file in config_file_list or []:
        if not os.path.isfile(user_file):
            raise UserInputError(f"config file not found: {user_file}")
        files.append(user_file)
    return files


def create_config(model_name, dataset_name, config_file_list=None, config_dict=None):
    """A RecBole :class:`Config` with the plugin's files; command-line ``--key=value`` still apply.

    ``dataset_name`` may list several prepared domains (``Food,Cell``): they are merged once into
    ``<data_path>/Food+Cell`` with domain-prefixed ids, e.g. for pre-training on source domains.
    """
    model, files = get_model(model_name), config_files_for(model_name, dataset_name, config_file_list)
    try:
        config = PluginConfig(model=model, dataset=dataset_name, config_file_list=files, config_dict=config_dict)
    except ValueError as error:  # RecBole's own checks of a few settings (topk, metrics, ...)
        raise UserInputError(str(error)) from None
    check_settings(config)
    if "," in dataset_name:
        merged_name = merge_domains(dataset_name.split(","), os.path.dirname(config["data_path"]))
        return create_config(model_name, merged_name, config_file_list, config_dict)
    check_atomic_files(config)
    if config["model"] in PLUGIN_MODELS:
        resolve_auto_settings(config)
    return config


def merge_domains(domains, data_path):
    """Merge prepared domain folders under ``data_path`` into one dataset (once); returns its name."""
    domains = [domain.strip() for domain in domains if domain.strip()]
    name = "+".join(domains)
    folder = Path(data_path) / name
    if not (folder / f"{name}.inter").is_file():
        for domain in domains:
            if not (Path(data_path) / domain / f"{domain}.inter").is_file():
                raise UserInputError(missing_dataset_message(domain, Path(data_path) / domain / f"{domain}.inter"))
        inputs = [str(Path(data_path) / domain) for domain in domains]
        prepare_main(["merge", "--inputs", *inputs, "--out", str(folder), "--name", name])
    return name


def check_atomic_files(config):
    """Fail with a clear message instead of RecBole's attempt to download an unknown dataset."""
    inter_file = Path(config["data_path"]) / f"{config['dataset']}.inter"
    if not inter_file.is_file() and config["benchmark_filename"] is None:
        raise UserInputError(missing_dataset_message(config["dataset"], inter_file))


def missing_dataset_message(name, inter_file):
    return (
        f"dataset '{name}' not found: no {inter_file}. Pass --data_path=<folder holding "
        f"{name}/{name}.inter>, or prepare it with `python -m recbole_st2si.data.prepare`"
    )


def create_dataset(config):
    """:class:`ST2SIDataset` for ST2SI, RecBole's dataset for every other model."""
    if config["model"] in PLUGIN_MODELS:
        return ST2SIDataset(config)
    return recbole_create_dataset(config)


def data_preparation(config, dataset):
    """RecBole's split and evaluation dataloaders; ST2SI trains on its multi-query loader instead."""
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if config["model"] in PLUGIN_MODELS:
        held_out = [loader._dataset for loader in (valid_data, test_data) if loader is not None]
        train_data = ST2SITrainDataLoader(config, train_data._dataset, shuffle=config["shuffle"], held_out_datasets=held_out)
    return train_data, valid_data, test_data
