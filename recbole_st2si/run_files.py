"""A run's files, all named after its checkpoint ``<name>.pth`` and written by this module alone.

=====================  ======================================================================
``<name>.pth``         the best weights so far (weights-only, see :func:`save_checkpoint`)
``<name>-resume.pth``  the whole training state at the start of the latest epoch (removed at the end)
``<name>-ilp.pth``     ST2SI's head on its own: item projection, item ids, item embedding
``<name>-backbone/``   ST2SI's backbone after ``train_stage: pretrain``
``<name>.serving.pth`` what serving needs besides the weights: settings, items, titles, histories
=====================  ======================================================================

Every file holds tensors, numbers and strings only (PyTorch >= 2.6 loads nothing else by default),
with a checksum (:mod:`recbole_st2si.safe_io`). A run has an identity, ``run_id``, written into its
checkpoint and its serving file, so that a serving file is never paired with another run's weights.
New run names carry a random part, so two runs started in the same second never share a name, and a
run's first checkpoint is created exclusively: no run replaces another's.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import torch
from recbole.utils import FeatureType, get_local_time

from recbole_st2si.data.windows import user_sequences
from recbole_st2si.errors import UserInputError
from recbole_st2si.safe_io import DamagedFileError, load_checked, save_checked

DAMAGED_CHECKPOINT_REMEDY = "start over with another --checkpoint_file, or delete it"
SERVING_FORMAT = 2


@dataclass(frozen=True)
class RunFiles:
    """The files of the run whose best checkpoint is ``checkpoint``."""

    checkpoint: Path

    @classmethod
    def of(cls, checkpoint):
        return cls(Path(checkpoint))

    @classmethod
    def new(cls, folder, model_name):
        """A run name no other run has: the model, the local time and a random part."""
        return cls(Path(folder) / f"{model_name}-{get_local_time()}-{uuid.uuid4().hex[:6]}.pth")

    def _sibling(self, suffix):
        return self.checkpoint.with_name(f"{self.checkpoint.stem}{suffix}")

    @property
    def resume(self):
        return self._sibling(f"-resume{self.checkpoint.suffix}")

    @property
    def ilp(self):
        return self._sibling(f"-ilp{self.checkpoint.suffix}")

    @property
    def backbone(self):
        return self._sibling("-backbone")

    @property
    def serving(self):
        return self._sibling(f".serving{self.checkpoint.suffix}")

    def interrupted(self):
        """Whether a run of this checkpoint saved anything to continue from."""
        return self.checkpoint.is_file() or self.resume.is_file()

    def discard_training(self):
        """Remove what an earlier attempt left to continue from, for a run that starts over."""
        for path in (self.checkpoint, self.resume, self.serving):
            path.unlink(missing_ok=True)

    def last_finished_epoch(self):
        """The epoch after which a resumed run continues."""
        source = self.resume if self.resume.is_file() else self.checkpoint
        return load_checked(source, remedy=DAMAGED_CHECKPOINT_REMEDY)["epoch"]


def is_writer(config):
    """Whether this process writes the run's files: the only one, or rank 0 of a distributed run."""
    return config["single_spec"] or config["local_rank"] == 0


def trained_names(model):
    """Names of the parameters that train: what a checkpoint holds (a frozen backbone is never saved)."""
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def checkpoint_state_dict(model):
    """What a checkpoint stores of a model: all of it (buffers included) when every parameter
    trains, else only the trained parameters."""
    trained, state = trained_names(model), model.state_dict()
    if len(trained) == sum(1 for _ in model.parameters()):
        return state
    return {name: tensor for name, tensor in state.items() if name in trained}


def frozen_weights_digest(model):
    """SHA-256 of the weights a checkpoint does not hold (a frozen backbone); computed once per model,
    for the feature cache's key and the serving file alike."""
    if getattr(model, "_frozen_weights_digest", None) is None:
        trained = trained_names(model)
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            if name not in trained:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        model._frozen_weights_digest = digest.hexdigest()
    return model._frozen_weights_digest


def save_checkpoint(path, checkpoint, create=False):
    """Write a checkpoint dict; ``create``: the run's first, which must not replace any file."""
    save_checked(checkpoint, path, exclusive=create)


def load_checkpoint(path, device="cpu", model_name=None):
    """A checkpoint dict written by :func:`save_checkpoint`; one line for a missing, damaged or other model's file."""
    try:
        checkpoint = load_checked(path, device, remedy=DAMAGED_CHECKPOINT_REMEDY)
    except FileNotFoundError:
        raise UserInputError(f"checkpoint {path}: no such file") from None
    if model_name and checkpoint.get("model") != model_name:
        raise UserInputError(f"{path} holds a {checkpoint.get('model')} model, not {model_name}")
    return checkpoint


def load_weights(model, checkpoint, path):
    """Load a checkpoint's weights into ``model``: exactly its trained parameters, nothing unexpected."""
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = set(missing) - (set(model.state_dict()) - trained_names(model))
    if unexpected or missing:
        raise UserInputError(
            f"{path} does not match this model: missing {sorted(missing)[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_other_parameter(checkpoint.get("other_parameter"))


def save_ilp(model, path):
    """Save ST2SI's head on its own: the item projection with the item ids it scores and, under
    ``id_embedding``, the item embedding. One backbone serves many domains by switching this small
    file, and a later stage (``top``) starts from a head that cheap ILP tuning has already trained."""
    head = {"weight": model.ilp.weight.detach().cpu(), "items": model.item_tokens}
    if model.item_embedding is not None:
        head["item_embedding"] = model.item_embedding.weight.detach().cpu()
    save_checked(head, path)


def load_ilp(model, path):
    """Start from the head file of an earlier run on the same items and backbone width. A file
    without an item embedding leaves this model's as it is (zero, where it starts); a file with one
    is refused by a model without it rather than half loaded."""
    try:
        saved = load_checked(path)
    except FileNotFoundError:
        raise UserInputError(f"ilp_checkpoint {path}: no such file") from None
    except DamagedFileError as error:
        raise UserInputError(f"ilp_checkpoint {path}: cannot read it ({error.reason})") from None
    if saved["items"] != model.item_tokens or saved["weight"].shape != model.ilp.weight.shape:
        raise UserInputError(
            f"ilp_checkpoint {path} scores other items or another backbone width than this dataset and backbone"
        )
    if "item_embedding" in saved and model.item_embedding is None:
        raise UserInputError(f"ilp_checkpoint {path} holds an item embedding: load it with id_embedding: True")
    with torch.no_grad():
        model.ilp.weight.copy_(saved["weight"])
        if "item_embedding" in saved:
            model.item_embedding.weight.copy_(saved["item_embedding"])


def _plain_settings(config):
    """The configuration's entries that a weights-only file stores (numbers, strings, lists, dicts)."""
    settings = {}
    for name, value in config.final_config_dict.items():
        try:
            settings[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue  # the device, enums: restored or not needed when serving
    return settings


def _item_titles(dataset, text_fields) -> list[str]:
    """Each item's title by internal id: its first text field (``text_fields``, else its first
    ``token_seq`` field, e.g. for a baseline on a dataset without a dataset config); empty if none."""
    columns = [] if dataset.item_feat is None else dataset.item_feat.columns
    sequences = [name for name in columns if dataset.field2type[name] == FeatureType.TOKEN_SEQ]
    field = (list(text_fields or []) or sequences or [None])[0]
    if field not in columns:
        return [""] * dataset.item_num
    values = dataset.item_feat[field]
    if dataset.field2type[field] == FeatureType.FLOAT:
        return [f"{value:g}" for value in values.tolist()]
    vocabulary = dataset.field2id_token[field]
    return [" ".join(str(vocabulary[token]) for token in row if token) for row in values.view(len(values), -1).tolist()]


def _embedded_item_features(dataset, model):
    """The item features a RecBole model embeds besides ids, which building it again needs: those of
    its feature layer (FDSA, SASRecF, GRU4RecF: ``selected_features``) and S3Rec's ``item_attribute``."""
    layer = getattr(model, "feature_embed_layer", None)
    fields = list(layer.field_names["item"]) if layer is not None else []
    if hasattr(model, "FEATURE_FIELD"):
        fields.append(model.FEATURE_FIELD)
    features = dataset.get_item_feature()
    return {
        field: {"values": features[field], "type": dataset.field2type[field].value, "size": dataset.num(field)}
        for field in fields
    }


def serving_info(config, dataset, split_datasets, model):
    """What a saved run needs to be served without its dataset files: the settings, the item and
    user vocabularies, item titles, every user's history (rebuilt from the split rows), the item
    features the model embeds and, for a model with a frozen backbone, which backbone it ran on with
    a hash of its weights. ``None``, with a warning, when the split is not leave-one-out (the
    histories cannot be rebuilt)."""
    try:
        sequences = user_sequences(*split_datasets)
    except UserInputError as error:
        getLogger().warning(f"this run cannot be served: {error}")
        return None
    info = {
        "model": config["model"],
        "dataset": config["dataset"],
        "config": _plain_settings(config),
        "items": [str(token) for token in dataset.field2id_token[dataset.iid_field]],
        "titles": _item_titles(dataset, config["text_fields"]),
        "users": [str(token) for token in dataset.field2id_token[dataset.uid_field]],
        "history_users": sequences.uid,
        "history_items": sequences.items,
        "history_offsets": sequences.offsets,
        "item_features": _embedded_item_features(dataset, model),
    }
    if hasattr(model, "backbone"):
        info.update(
            item_token_ids=dataset.item_token_ids,
            item_token_len=dataset.item_token_len,
            backbone={
                "llm_path": config["llm_path"],
                "pretrained_backbone": config["pretrained_backbone"],
                "frozen_weights_sha256": frozen_weights_digest(model),
            },
        )
    return info


def write_serving_file(files: RunFiles, info):
    """The serving file of a run (see :mod:`recbole_st2si.serving`); written with the run's first checkpoint."""
    save_checked({"format": SERVING_FORMAT, **info}, files.serving)


def read_serving_file(files: RunFiles, checkpoint):
    """The serving file beside a checkpoint, checked to be the same run's."""
    if not files.serving.is_file():
        raise UserInputError(
            f"{files.checkpoint} has no serving file {files.serving.name} beside it; runs write one with their first checkpoint"
        )
    info = load_checked(files.serving, remedy="this serving file cannot be served; train the run again")
    if info.get("format") != SERVING_FORMAT:
        raise UserInputError(f"serving file {files.serving} has format {info.get('format')}, not {SERVING_FORMAT}: "
                             "written by another version; train the run again")
    if info.get("run_id") != checkpoint.get("run_id"):
        raise UserInputError(f"{files.checkpoint} and {files.serving.name} belong to different runs "
                             f"({checkpoint.get('run_id')} and {info.get('run_id')}): serve a checkpoint with its own serving file")
    return info
