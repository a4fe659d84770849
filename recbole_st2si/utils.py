"""Glue between RecBole's factories and the plugin's classes: config, dataset, dataloaders, model."""

import importlib
import os
from pathlib import Path

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import create_samplers, get_dataloader
from recbole.data import data_preparation as recbole_data_preparation
from recbole.utils import get_model as recbole_get_model

from recbole_st2si.config import PluginConfig
from recbole_st2si.data import prepare
from recbole_st2si.data.atomic_files import read_as_written
from recbole_st2si.errors import UserInputError
from recbole_st2si.settings import check_settings


def plugin_class(module, name):
    """Class ``name`` of the plugin's module ``recbole_st2si.<module>``, or None."""
    try:
        return getattr(importlib.import_module(f"recbole_st2si.{module}"), name, None)
    except ModuleNotFoundError as error:
        if error.name != f"recbole_st2si.{module}":
            raise
        return None


def get_model(model_name):
    """The plugin's model class (``recbole_st2si.model.<name lower case>``), else RecBole's."""
    model_class = plugin_class(f"model.{model_name.lower()}", model_name)
    if model_class is not None:
        return model_class
    try:
        return recbole_get_model(model_name)
    except (ValueError, ModuleNotFoundError):  # RecBole's last search place needs lightgbm and xgboost
        raise UserInputError(f"unknown model {model_name!r}: neither a recbole_st2si nor a RecBole model") from None


def create_config(model_name, dataset_name, config_file_list=None, config_dict=None):
    """The run's :class:`~recbole_st2si.config.PluginConfig`: the one place where it is built.

    ``dataset_name`` may list several prepared domains (``Food,Cell``): they are merged once into
    ``<data_path>/Food+Cell`` with domain-prefixed ids, e.g. for pre-training on source domains.
    """
    for user_file in config_file_list or []:
        if not os.path.isfile(user_file):
            raise UserInputError(f"config file not found: {user_file}")
    model_class = get_model(model_name)
    try:
        config = PluginConfig(model_class, dataset_name, config_file_list, config_dict)
    except ValueError as error:  # RecBole's own checks of a few settings (topk, metrics, ...)
        raise UserInputError(str(error)) from None
    check_settings(config, model_class)
    if "," in dataset_name:
        merged_name = merge_domains(dataset_name.split(","), os.path.dirname(config["data_path"]))
        return create_config(model_name, merged_name, config_file_list, config_dict)
    check_atomic_files(config)
    if hasattr(model_class, "resolve_settings"):
        model_class.resolve_settings(config)
    return config


def merge_domains(domains, data_path):
    """Merge prepared domain folders under ``data_path`` into one dataset (once); returns its name.

    A missing or malformed domain, or a domain named twice, is a :class:`UserInputError`."""
    domains = [domain.strip() for domain in domains if domain.strip()]
    name = "+".join(domains)
    folder = Path(data_path) / name
    if not (folder / f"{name}.inter").is_file():
        for domain in domains:
            if not (Path(data_path) / domain / f"{domain}.inter").is_file():
                raise UserInputError(missing_dataset_message(domain, Path(data_path) / domain / f"{domain}.inter"))
        prepare.merge_domains([Path(data_path) / domain for domain in domains], folder, name)
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
    """``<Model>Dataset`` of :mod:`recbole_st2si.data.dataset`, else RecBole's dataset for the model;
    either reads the atomic files as written (:mod:`recbole_st2si.data.atomic_files`)."""
    dataset_class = plugin_class("data.dataset", f"{config['model']}Dataset")
    with read_as_written():
        return dataset_class(config) if dataset_class else recbole_create_dataset(config)


def data_preparation(config, dataset):
    """RecBole's split and evaluation dataloaders; a model with a ``<Model>TrainDataLoader`` in
    :mod:`recbole_st2si.data.dataloader` trains on it (it sees the held-out rows too, which complete
    each user's history)."""
    train_loader_class = plugin_class("data.dataloader", f"{config['model']}TrainDataLoader")
    if train_loader_class is None:
        return recbole_data_preparation(config, dataset)
    built_datasets = dataset.build()
    train_dataset, valid_dataset, test_dataset = built_datasets
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built_datasets)
    train_data = train_loader_class(
        config, train_dataset, train_sampler, shuffle=config["shuffle"], held_out_datasets=(valid_dataset, test_dataset)
    )
    valid_data = get_dataloader(config, "valid")(config, valid_dataset, valid_sampler, shuffle=False)
    test_data = get_dataloader(config, "test")(config, test_dataset, test_sampler, shuffle=False)
    return train_data, valid_data, test_data
