"""One call that trains and tests ST2SI or any RecBole model under the same evaluation: RecBole's
``run_recbole`` flow with the plugin's config, dataset, dataloaders, model and trainer."""

import time
from logging import getLogger

from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_st2si.distributed import distributed_settings, spawn_ranks
from recbole_st2si.errors import UserInputError
from recbole_st2si.run_files import RunFiles, is_writer, serving_info
from recbole_st2si.trainer import get_trainer
from recbole_st2si.utils import create_config, create_dataset, data_preparation, get_model


def run_recbole_st2si(
    model, dataset, config_file_list=None, config_dict=None, saved=True, callback_fn=None, checkpoint_file=None, resume=False
):
    """Train ``model`` on ``dataset`` and evaluate it with RecBole's full-ranking evaluation.

    Args:
        model (str): ``ST2SI`` or the name of any RecBole model (``SASRec``, ``GRU4Rec``, ...).
        dataset (str): dataset name, e.g. ``ml-100k`` or ``Scientific``.
        config_file_list (list[str], optional): extra YAML files, applied after the plugin's defaults.
        config_dict (dict, optional): parameters that override the files, e.g. the command line's
            ``--key=value`` settings (:func:`~recbole_st2si.config.parse_overrides`).
        saved (bool): keep the best checkpoint and reload it for the test.
        callback_fn (callable, optional): ``callback_fn(epoch_idx, valid_score)`` after every validation.
        checkpoint_file (str, optional): where the best model is saved, instead of a new timestamped
            file in ``checkpoint_dir``.
        resume (bool): continue an interrupted training from ``checkpoint_file``: from the latest
            training state saved beside it (weights, optimiser, scheduler, early stopping, random
            generators), ending as an uninterrupted run would; from the best checkpoint alone where
            none was saved (the epochs after its best epoch are trained again).

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``,
        and, for reports, ``train_time_s`` (training and validation), ``dataset_statistics``, the
        final ``config`` and the ``trainer`` (with its model).
    """
    if resume and not checkpoint_file:
        raise UserInputError("resume needs the checkpoint of an interrupted run: --checkpoint_file=<its .pth>")
    if resume and not RunFiles.of(checkpoint_file).interrupted():
        raise UserInputError(f"--resume: {checkpoint_file} does not exist, nor its training state beside it")
    config = create_config(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if checkpoint_file:
        trainer.use_checkpoint(checkpoint_file, resume)
    if saved and is_writer(config):  # written with the first checkpoint: an interrupted run can be served too
        trainer.serving_info = serving_info(config, dataset, (train_data.dataset, valid_data.dataset, test_data.dataset), model)
    fit_start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    train_time = time.perf_counter() - fit_start
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    best_valid_result, test_result = plain_metrics(best_valid_result), plain_metrics(test_result)

    environment = get_environment(config)
    logger.info("The running environment of this training is as follows:\n" + environment.draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "train_time_s": train_time,
        "dataset_statistics": {"users": dataset.user_num, "items": dataset.item_num, "inters": dataset.inter_num},
        "config": config,
        "trainer": trainer,
    }


def plain_metrics(result):
    """RecBole's metrics as Python floats: numpy 2 prints its scalars as ``np.float64(0.05)``."""
    return None if result is None else {name: float(value) for name, value in result.items()}


def run_recbole_st2si_distributed(
    model,
    dataset,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=2,
    world_size=-1,
    ip="localhost",
    port=5678,
    offset=0,
):
    """:func:`run_recbole_st2si` in ``nproc`` DDP processes on this machine, as RecBole's ``run`` does.

    One process per GPU (NCCL), or gloo processes on the CPU without CUDA. Each rank trains on its
    share of the training samples and evaluates its share of the users; the metrics are gathered
    across ranks. For several machines, start it on each with the same ``world_size``, ``ip`` and
    ``port``, and ``offset`` = the number of processes on the machines before it.

    Returns:
        dict: the result of global rank 0 (``None`` on the other machines).
    """
    # Bad input fails here, not in every rank; several domains are merged here once, so that no rank
    # builds a second config (and process group) for the merged dataset.
    dataset = create_config(model, dataset, config_file_list, config_dict)["dataset"]
    settings = {**(config_dict or {}), **distributed_settings(nproc, world_size, ip, port, offset)}
    return spawn_ranks(run_rank, nproc, model, dataset, config_file_list, settings, saved)


def run_rank(local_rank, model, dataset, config_file_list, config_dict, saved=True):
    """One process of :func:`run_recbole_st2si_distributed`; its result without the config and trainer,
    which belong to this process (its device, process group and DDP model) and do not travel."""
    result = run_recbole_st2si(model, dataset, config_file_list, {**config_dict, "local_rank": local_rank}, saved)
    return {key: value for key, value in result.items() if key not in ("config", "trainer")}
