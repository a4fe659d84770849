"""The plugin's Config and dispatch: defaults from the package, models found by name, a normal install."""

import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer

from recbole_st2si import config as plugin_config
from recbole_st2si.data import dataloader, dataset
from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.trainer import ST2SITrainer
from recbole_st2si.utils import get_model

from .conftest import DATA_DIR
from .test_cli import parse_test_results

ROOT = Path(__file__).resolve().parent.parent


def test_package_defaults_apply_to_plugin_and_recbole_models(make_config):
    st2si, sasrec = make_config(), make_config(model="SASRec")
    for config in (st2si, sasrec):  # overall.yaml: the protocol every model shares
        assert config["metrics"] == ["Recall", "NDCG", "MRR", "Hit"] and config["valid_metric"] == "NDCG@10"
    assert st2si["alignment_prompt"] == "Please give the index of the following item: "  # properties/model/ST2SI.yaml
    assert "alignment_prompt" not in sasrec


def test_a_missing_default_file_is_an_error(make_config, monkeypatch, tmp_path):
    monkeypatch.setattr(plugin_config, "MODEL_DEFAULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="ST2SI.yaml"):
        make_config()


def test_a_second_text_model_is_found_by_its_name(settings, monkeypatch, tmp_path):
    """A model module, its YAML defaults and ``<Model>Dataset`` / ``<Model>TrainDataLoader`` /
    ``<Model>Trainer`` classes are all a new model needs: no branch names it."""
    class Echo(ST2SI):
        pass

    class EchoTrainer(ST2SITrainer):
        pass

    Echo.__module__ = "recbole_st2si.model.echo"
    module = types.ModuleType("recbole_st2si.model.echo")
    module.Echo = Echo
    monkeypatch.setitem(sys.modules, "recbole_st2si.model.echo", module)
    monkeypatch.setattr(dataset, "EchoDataset", dataset.ST2SIDataset, raising=False)
    monkeypatch.setattr(dataloader, "EchoTrainDataLoader", dataloader.ST2SITrainDataLoader, raising=False)
    monkeypatch.setattr(sys.modules["recbole_st2si.trainer"], "EchoTrainer", EchoTrainer, raising=False)
    shutil.copy(plugin_config.MODEL_DEFAULTS_DIR / "ST2SI.yaml", tmp_path / "Echo.yaml")
    monkeypatch.setattr(plugin_config, "MODEL_DEFAULTS_DIR", tmp_path)

    assert get_model("Echo") is Echo and get_model("SASRec") is SASRec
    auto = settings(train_stage="auto", feature_cache_dir=str(tmp_path / "cache"))  # not the checkout's saved/
    result = run_recbole_st2si("Echo", "tiny", config_dict=auto)
    assert result["config"]["train_stage"] == "ilp"  # the auto rule ran for the new model too
    assert type(result["trainer"]) is EchoTrainer and isinstance(result["trainer"].model, Echo)
    sasrec = run_recbole_st2si("SASRec", "tiny", config_dict=settings(), saved=False)
    assert isinstance(sasrec["trainer"], Trainer) and not isinstance(sasrec["trainer"], ST2SITrainer)


def _copy_of_the_checkout(destination):
    """The checkout's files as git lists them (tracked, and new ones not ignored): what ``pip install .``
    of a clone reads. Building writes its ``build/`` and ``*.egg-info`` next to them, so never here."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():  # a deleted file is still listed; .venv may be a link
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout, as ``pip install .`` builds one."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    _copy_of_the_checkout(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_carries_every_module_and_the_yaml_defaults(wheel):
    """``properties/`` and ``dataset_configs/`` at the checkout's top become ``recbole_st2si/properties``
    and ``recbole_st2si/dataset_configs`` in the wheel, byte for byte; no other YAML file ships."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        yaml_files = {}
        for folder in ("properties", "dataset_configs"):
            for path in (ROOT / folder).rglob("*.yaml"):
                yaml_files[f"recbole_st2si/{path.relative_to(ROOT).as_posix()}"] = path.read_bytes()
        assert {"recbole_st2si/properties/overall.yaml", "recbole_st2si/properties/model/ST2SI.yaml",
                "recbole_st2si/dataset_configs/ml-100k.yaml"} <= set(yaml_files)
        assert {name for name in names if name.endswith(".yaml")} == set(yaml_files)
        assert all(archive.read(name) == content for name, content in yaml_files.items())
    modules = {f"recbole_st2si/{path.relative_to(ROOT / 'recbole_st2si').as_posix()}"
               for path in (ROOT / "recbole_st2si").rglob("*.py")}
    assert modules <= names


def test_a_non_editable_install_keeps_the_defaults(wheel, tmp_path):
    """``pip install`` of the wheel (not a link to this folder) into a scratch folder, then the
    command line run from elsewhere: the defaults travel with the package."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = tmp_path / "run_recbole_st2si.py"
    shutil.copy(ROOT / "run_recbole_st2si.py", script)
    work = tmp_path / "work"
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "from recbole_st2si import config, utils\n"
         "print(config.__file__, config.OVERALL_DEFAULTS, config.MODEL_DEFAULTS_DIR / 'ST2SI.yaml', config.DATASET_DEFAULTS_DIR)\n"
         "print(utils.create_config('ST2SI', 'ml-100k', config_dict={'llm_path': 'tiny-random'})['text_fields'])"],
        cwd=work, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    package = target / "recbole_st2si"
    paths, text_fields = where.stdout.strip().splitlines()[-2:]
    assert paths.split() == [str(package / "config.py"), str(package / "properties" / "overall.yaml"),
                             str(package / "properties" / "model" / "ST2SI.yaml"), str(package / "dataset_configs")]
    assert text_fields == "['movie_title']"  # dataset_configs/ml-100k.yaml
    settings = {"data_path": str(DATA_DIR), "llm_path": "tiny-random", "epochs": 1, "MAX_ITEM_LIST_LENGTH": 10}
    command = [sys.executable, str(script), "--dataset=tiny", *(f"--{key}={value}" for key, value in settings.items()),
               f"--checkpoint_dir={work}", "--show_progress=False"]
    result = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(work.glob("ST2SI-*-ilp.pth"))  # ST2SI.yaml's train_stage: auto -> ilp on CPU
    checkout = run_recbole_st2si("ST2SI", "tiny", config_dict={
        **settings, "checkpoint_dir": str(tmp_path / "checkout"), "feature_cache_dir": str(tmp_path / "cache"),
        "show_progress": False,
    })
    assert parse_test_results(result.stdout) == checkout["test_result"]  # the checkout's defaults, metrics included
