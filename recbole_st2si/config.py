"""The plugin's :class:`Config`: its defaults (``properties/``, ``dataset_configs/``) ship with the
package, and settings come only from files and ``config_dict``, never from ``sys.argv`` behind the
caller's back (see :mod:`recbole_st2si.command_line`)."""

from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from recbole.config import Config

from recbole_st2si.command_line import split_list
from recbole_st2si.errors import UserInputError

PACKAGE_DIR = Path(__file__).resolve().parent


def defaults_folder(name):
    """The folder of YAML defaults ``name`` (``properties`` or ``dataset_configs``).

    The checkout keeps them at its top level; a built wheel carries them inside the package as
    ``recbole_st2si/<name>`` (setup.cfg maps the folders to sub-packages), so an installed copy reads
    its own, and a source tree or an editable install reads the checkout's."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


PROPERTIES_DIR = defaults_folder("properties")
OVERALL_DEFAULTS = PROPERTIES_DIR / "overall.yaml"
MODEL_DEFAULTS_DIR = PROPERTIES_DIR / "model"
DATASET_DEFAULTS_DIR = defaults_folder("dataset_configs")


def plugin_defaults_files(model_name, dataset_name, plugin_model):
    """The package's default files for this run, general first: overall, the model's, the dataset's.

    A plugin model without its defaults, or a missing ``overall.yaml``, means a broken installation."""
    files = [OVERALL_DEFAULTS]
    model_file = MODEL_DEFAULTS_DIR / f"{model_name}.yaml"
    if plugin_model or model_file.is_file():
        files.append(model_file)
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"recbole_st2si is installed without its default settings {missing}: reinstall it")
    dataset_file = DATASET_DEFAULTS_DIR / f"{dataset_name}.yaml"
    return files + ([dataset_file] if dataset_file.is_file() else [])


def _list_settings():
    """Plugin settings given as lists: those with a list default, and ``lora_target_modules`` (default ``~``)."""
    names = {"lora_target_modules"}
    for file in (OVERALL_DEFAULTS, *MODEL_DEFAULTS_DIR.glob("*.yaml")):
        defaults = yaml.safe_load(file.read_text())
        names |= {name for name, value in defaults.items() if isinstance(value, list)}
    return names


LIST_SETTINGS = _list_settings()


def _as_list(value):
    """A list setting as a list: RecBole's ``eval`` keeps ``a,b`` or ``[a,b]`` strings, ``5,10`` a tuple."""
    if isinstance(value, str):
        return split_list(value)
    return list(value) if isinstance(value, tuple) else value


def read_settings_file(path, loader):
    """The settings of a user's YAML file; one line naming the file (with the line and column of a
    syntax error) for a file that is not YAML settings."""
    try:
        with open(path, encoding="utf-8") as file:
            settings = yaml.load(file.read(), Loader=loader)
    except UnicodeDecodeError:
        raise UserInputError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserInputError(f"config file {path}{where}: {' '.join(problem.split())}") from None
    if settings is None:  # an empty file
        return {}
    if not isinstance(settings, dict):
        raise UserInputError(f"config file {path} holds a {type(settings).__name__}, not settings: "
                             "write one `name: value` per line")
    return settings


class PluginConfig(Config):
    """RecBole's :class:`Config` with the plugin's YAML files as internal defaults (after RecBole's
    own, before the user's files); list settings accept ``a,b`` and ``[a,b]``; a distributed run
    without CUDA gets gloo and the CPU; a user's YAML file that is not settings is one
    :class:`UserInputError` line naming it.

    ``plugin_config_dict`` holds the settings the plugin's files gave, for run records.

    For a distributed run RecBole's ``_init_device`` asserts that ``gpu_id`` names ``nproc`` GPUs,
    starts an NCCL process group and puts rank ``r`` on ``cuda:r``: all three fail on a CPU-only
    machine (or with ``use_gpu: False``). Single-process runs and GPU runs are left to RecBole.
    """

    def _load_config_files(self, file_list):
        settings = {}
        for path in file_list or []:
            settings.update(read_settings_file(path, self.yaml_loader))
        return settings

    def _load_cmd_line(self):
        """Nothing: the entry points pass their ``--key=value`` settings as ``config_dict``."""
        return {}

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self.plugin_config_dict = {}
        plugin_model = model_class.__module__.startswith(f"{__package__}.")
        for file in plugin_defaults_files(model, dataset, plugin_model):
            self.plugin_config_dict.update(self._update_internal_config_dict(file) or {})

    def _get_final_config_dict(self):
        settings = super()._get_final_config_dict()
        for name in LIST_SETTINGS & settings.keys():
            settings[name] = _as_list(settings[name])
        return settings

    def _init_device(self):
        settings = self.final_config_dict
        if "local_rank" not in settings or (settings["use_gpu"] and torch.cuda.device_count() > 0):
            super()._init_device()
            return
        dist.init_process_group(
            backend="gloo",
            rank=settings["local_rank"] + settings["offset"],
            world_size=settings["world_size"],
            init_method=f"tcp://{settings['ip']}:{settings['port']}",
        )
        settings.update(device=torch.device("cpu"), single_spec=False)
        if settings["local_rank"] != 0:  # as RecBole does: one process logs and shows progress
            settings.update(state="error", show_progress=False, verbose=False)
