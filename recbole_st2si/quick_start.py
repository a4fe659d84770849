"""One call that trains and tests ST2SI or any RecBole model under the same evaluation."""

from logging import getLogger

from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_st2si.trainer import get_trainer
from recbole_st2si.utils import create_config, create_dataset, data_preparation, get_model


def run_recbole_st2si(model, dataset, config_file_list=None, config_dict=None, saved=True, callback_fn=None):
    """Train ``model`` on ``dataset`` and evaluate it with RecBole's full-ranking evaluation.

    Args:
        model (str): ``ST2SI`` or the name of any RecBole model (``SASRec``, ``GRU4Rec``, ...).
        dataset (str): dataset name, e.g. ``ml-100k`` or ``Scientific``.
        config_file_list (list[str], optional): extra YAML files, applied after the plugin's defaults.
        config_dict (dict, optional): parameters that override everything but the command line.
        saved (bool): keep the best checkpoint and reload it for the test.
        callback_fn (callable, optional): ``callback_fn(epoch_idx, valid_score)`` after every validation.

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``.
    """
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
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    environment = get_environment(config)
    logger.info("The running environment of this training is as follows:\n" + environment.draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }
