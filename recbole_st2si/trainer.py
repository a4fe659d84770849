"""Trainers: weights-only checkpoints for every RecBole model, and ST2SI's optimisation recipe.

A model's trainer is found by name: ``<Model>Trainer`` in this module, else RecBole's.
"""

import math
import os
import random
import sys
import uuid
from logging import getLogger

import numpy as np
import torch
import torch.distributed as dist
from recbole.trainer import AbstractTrainer, Trainer
from recbole.utils import get_trainer as recbole_get_trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from recbole_st2si.backbone import load_tokenizer, save_backbone
from recbole_st2si.compiling import compile_wanted
from recbole_st2si.data.cached_dataloader import FeatureCache
from recbole_st2si.precision import autocast_dtype
from recbole_st2si.run_files import (
    RunFiles,
    checkpoint_state_dict,
    is_writer,
    load_checkpoint,
    load_ilp,
    load_weights,
    save_checkpoint,
    save_ilp,
    write_serving_file,
)
from recbole_st2si.safe_io import save_checked

TRAINED_BACKBONE_PART = {"top": "the backbone's top layers", "lora": "the backbone's LoRA adapters"}  # by train_stage


def random_states():
    """The global random generators a training epoch draws from (dropout, samplers, shuffling)."""
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:]),
        "python": random.getstate(),
    }


def restore_random_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


class SafeCheckpointMixin:
    """Checkpoints made of tensors and numbers only, reloaded with ``torch.load(weights_only=True)``,
    named and written through :mod:`recbole_st2si.run_files`.

    RecBole pickles its ``Config`` into every checkpoint, which PyTorch >= 2.6 refuses to load by
    default, so RecBole's own reload of the best model for the test fails there. Mixed in front of
    any RecBole trainer (see :func:`get_trainer`), this keeps RecBole's training loop untouched.
    A run gets a name no other run has and an identity (``run_id``); its first checkpoint is
    created exclusively and its serving file (``serving_info``, when set) is written with it. In a
    distributed run rank 0 writes the files and every rank reloads the checkpoint for the test.
    """

    def __init__(self, config, model):
        # RecBole creates the folder after checking that it is missing: DDP ranks race there
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        super().__init__(config, model)
        self.checkpoint_valid_result = None
        self.pending_resume_state = None
        self.saving_resume_state = False
        self.checkpoint_created = False
        self.serving_info = None
        identity = [str(RunFiles.new(config["checkpoint_dir"], config["model"]).checkpoint), uuid.uuid4().hex]
        if not config["single_spec"]:  # one name and identity for all ranks: rank 0's
            dist.broadcast_object_list(identity, src=0)
        self.saved_model_file, self.run_id = identity

    def use_checkpoint(self, checkpoint_file, resume=False):
        """Save the best model to ``checkpoint_file``; ``resume``: continue the interrupted run saved there."""
        self.saved_model_file = str(checkpoint_file)
        if resume:
            self.resume_checkpoint(checkpoint_file)

    def _valid_epoch(self, valid_data, show_progress=False):
        # RecBole saves a new best model before it updates ``best_valid_result``; the checkpoint keeps
        # the validation result of its own weights, so that a resumed run can report it.
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress)
        self.checkpoint_valid_result = valid_result
        return valid_score, valid_result

    def _checkpoint(self, epoch):
        # Modules some models list as "other parameters" (FDSA's feature embedding) are pickled
        # objects, not tensors; their weights are in the state dict already.
        other = self.model.other_parameter() or {}
        return {
            "model": self.config["model"],
            "run_id": self.run_id,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": {key: float(value) for key, value in (self.checkpoint_valid_result or {}).items()},
            "state_dict": checkpoint_state_dict(self.model),
            "other_parameter": {k: v for k, v in other.items() if not isinstance(v, torch.nn.Module)},
            "optimizer": self.optimizer.state_dict(),
        }

    def save_pretrained_model(self, epoch, saved_model_file):
        """RecBole's pre-training checkpoint (S3Rec). Its fine-tuning loads the file with a plain
        ``torch.load``, which fails on a CPU machine for CUDA tensors: the weights are saved on the
        CPU, without the optimiser state that fine-tuning does not use."""
        checkpoint = self._checkpoint(epoch)
        del checkpoint["optimizer"]
        checkpoint["state_dict"] = {name: tensor.cpu() for name, tensor in checkpoint["state_dict"].items()}
        save_checked(checkpoint, saved_model_file)
        self.saved_model_file = saved_model_file

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not is_writer(self.config):
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(saved_model_file, self._checkpoint(epoch), create=not self.checkpoint_created)
        if not self.checkpoint_created and self.serving_info is not None:
            write_serving_file(RunFiles.of(saved_model_file), {**self.serving_info, "run_id": self.run_id})
        self.checkpoint_created = True
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's training loop; before every epoch but the first the whole training state is
        saved beside the checkpoint (see :meth:`save_resume_state`), and removed once training ends."""
        self.saving_resume_state = saved
        self.resume_file = RunFiles.of(self.saved_model_file).resume  # pre-training renames saved_model_file
        if self.pending_resume_state:
            self._restore_loop_state(self.pending_resume_state, train_data)
            self.pending_resume_state = None
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved and is_writer(self.config):
            self.resume_file.unlink(missing_ok=True)
        return result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.save_resume_state(epoch_idx, train_data)
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)

    def save_resume_state(self, epoch_idx, train_data):
        """Everything the epochs from ``epoch_idx`` on depend on: the trained weights, optimiser,
        scheduler, early-stopping state, losses so far, the training loader's random generators
        (shuffling, windows) and the global ones, so that a resumed run trains exactly as an
        uninterrupted one. Written atomically; the first epoch of a run has nothing to save yet."""
        if not self.saving_resume_state or epoch_idx == self.start_epoch or not is_writer(self.config):
            return
        scheduler = getattr(self, "scheduler", None)
        state = {
            **self._checkpoint(epoch_idx - 1),
            "best_valid_result": {key: float(value) for key, value in (self.best_valid_result or {}).items()},
            "train_loss_dict": {int(key): float(value) for key, value in self.train_loss_dict.items()},
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "generators": {name: value.get_state() for name, value in vars(train_data).items()
                           if isinstance(value, torch.Generator)},
            "random": random_states(),
        }
        save_checked(state, self.resume_file)

    def load_checkpoint(self, checkpoint_file):
        """Load model weights from one of our checkpoints; returns the whole checkpoint dict."""
        checkpoint = load_checkpoint(checkpoint_file, self.device, self.config["model"])
        load_weights(self.model, checkpoint, checkpoint_file)
        self.logger.info(f"Loading model parameters from {checkpoint_file}")
        return checkpoint

    def resume_checkpoint(self, resume_file):
        """Continue an interrupted run: from its latest training state where one was saved beside
        the checkpoint (the same course as without the interruption), else from the best checkpoint
        (the epochs after it are trained again). RecBole's ``load_state_dict`` checks are replaced by ours."""
        files = RunFiles.of(resume_file)
        full_state = files.resume.is_file()
        checkpoint = self.load_checkpoint(files.resume if full_state else files.checkpoint)
        self.saved_model_file = str(resume_file)
        self.run_id = checkpoint.get("run_id", self.run_id)
        self.checkpoint_created = files.checkpoint.is_file()
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.best_valid_result = self.checkpoint_valid_result = checkpoint.get("best_valid_result") or None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if full_state:
            self.train_loss_dict = dict(checkpoint["train_loss_dict"])
            self.pending_resume_state = checkpoint
        source = "its latest training state" if full_state else "its best checkpoint"
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}, from {source}")

    def _restore_loop_state(self, state, train_data):
        """What :meth:`resume_checkpoint` cannot restore before ``fit``: the scheduler (built in
        ``fit``), the training loader's generators and the global random generators."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None and state["scheduler"]:
            scheduler.load_state_dict(state["scheduler"])
        for name, generator_state in state["generators"].items():
            getattr(train_data, name).set_state(generator_state)
        restore_random_states(state["random"])

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and eval_data:
            if not self.config["single_spec"]:
                dist.barrier()  # until rank 0 has written the checkpoint
            self.load_checkpoint(model_file or self.saved_model_file)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


class CPUDistributedInit(AbstractTrainer):
    """Wraps a CPU model in DDP without ``device_ids``, as DDP requires for CPU modules.

    RecBole's ``AbstractTrainer.__init__`` always passes ``device_ids=[local_rank]`` (and converts
    batch norm to its GPU-only synchronized form). Listed after RecBole's trainer in a class's bases,
    this class sits right before ``AbstractTrainer`` in the MRO, so RecBole's ``Trainer.__init__``
    reaches it and the rest of RecBole's set-up runs unchanged.
    """

    def __init__(self, config, model):
        if config["single_spec"] or config["device"].type != "cpu":
            super().__init__(config, model)
            return
        self.config = config
        self.model = model
        self.distributed_model = DistributedDataParallel(model)


_safe_trainers = {}


def get_trainer(model_type, model_name):
    """``<model_name>Trainer`` of this module, else RecBole's trainer with :class:`SafeCheckpointMixin` in front."""
    plugin_trainer = getattr(sys.modules[__name__], f"{model_name}Trainer", None)
    if plugin_trainer is not None:
        return plugin_trainer
    base = recbole_get_trainer(model_type, model_name)
    if base not in _safe_trainers:
        _safe_trainers[base] = type(f"Safe{base.__name__}", (SafeCheckpointMixin, base, CPUDistributedInit), {})
    return _safe_trainers[base]


class ST2SITrainer(SafeCheckpointMixin, Trainer, CPUDistributedInit):
    """RecBole's training loop with the authors' recipe: AdamW with separate learning rates for the
    backbone (``learning_rate``) and the ILP with the item embedding of ``id_embedding`` (``ilp_learning_rate``), a cosine schedule with
    ``warmup_steps`` warm-up steps, ``gradient_accumulation_steps``, and autocast in ``mixed_precision``
    (:func:`~recbole_st2si.precision.autocast_dtype`: on a CPU, bf16 where it is native, else float32). Checkpoints hold only the trained parameters, so a frozen
    backbone is never written to disk again.

    With a frozen backbone (``train_stage: ilp``, ``feature_cache: True``) the trainer runs the
    backbone once (:class:`~recbole_st2si.data.cached_dataloader.FeatureCache`), then trains and
    evaluates the ILP on the cached ``[Q]`` states. After training, the best ILP is saved on its
    own, and after ``pretrain`` the backbone too.
    """

    def __init__(self, config, model):
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"]))
        super().__init__(config, model)
        self.autocast_dtype = autocast_dtype(config["mixed_precision"], self.device)
        self.scheduler = None
        self.uses_feature_cache = config["train_stage"] in ("ilp", "top") and bool(config["feature_cache"])
        self.feature_cache = None  # built by fit
        if config["ilp_checkpoint"]:
            load_ilp(model, config["ilp_checkpoint"])
        self.logger.info(set_color("learning rates", "blue") + f": {self.learning_rates()}")

    def learning_rates(self):
        """The peak learning rates of what trains, as the optimiser holds them: the configuration
        also lists ``learning_rate`` when the backbone is frozen and it trains nothing."""
        ilp, *backbone = self.optimizer.param_groups
        part = TRAINED_BACKBONE_PART.get(self.config["train_stage"], "backbone")
        backbone_rate = f"{part} {backbone[0]['lr']:g}" if backbone else "backbone frozen"
        return (f"ILP {ilp['lr']:g}, {backbone_rate} ({self.config['warmup_steps']} warm-up steps, "
                "then cosine decay)")

    def _build_optimizer(self, **kwargs):
        head = [p for p in self.model.head_parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head, "lr": self.config["ilp_learning_rate"]}]
        if rest:
            groups.append({"params": rest, "lr": self.learning_rate})
        # fused: one kernel for every parameter's update, about three times faster than the default on a CPU
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay, fused=self.device.type in ("cpu", "cuda"))

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.uses_feature_cache:
            self.feature_cache = FeatureCache(self.config, self.model, train_data)
            train_data = self.feature_cache.train_loader(train_data)
            valid_data = valid_data and self.feature_cache.eval_loader(valid_data)
        epoch_tokens = getattr(train_data, "sample_tokens", None)
        if self.model.upper_decoder is not None and epoch_tokens is not None:
            if compile_wanted(self.config["compile"], int(epoch_tokens.sum())):
                self.model.compile_trained_layers()
        steps_per_epoch = math.ceil(len(train_data) / self.accumulation_steps)
        # A resumed run continues the schedule where it stopped; the optimiser state it loaded holds
        # each group's ``initial_lr``, which a scheduler that does not start at step 0 needs.
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer,
            self.config["warmup_steps"],
            max(1, steps_per_epoch * self.epochs),
            last_epoch=self.start_epoch * steps_per_epoch - 1,
        )
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved and is_writer(self.config):
            self.load_checkpoint(self.saved_model_file)
            self.save_parts()
        return result

    def save_parts(self):
        """Save the ILP on its own (small) and, after pre-training, the backbone, named after the
        run's checkpoint (:class:`~recbole_st2si.run_files.RunFiles`), so that no run replaces
        another's. Called after the best checkpoint's weights are loaded."""
        config, logger, files = self.config, getLogger(), RunFiles.of(self.saved_model_file)
        save_ilp(self.model, files.ilp)
        logger.info(set_color("ILP saved", "blue") + f": {files.ilp} (reuse it with --ilp_checkpoint={files.ilp})")
        if config["train_stage"] == "pretrain":
            folder = config["pretrained_backbone_dir"] or files.backbone
            if os.path.exists(folder):
                logger.warning(f"pretrained_backbone_dir {folder} exists: its backbone is replaced by this run's")
            tokenizer, _ = load_tokenizer(config["llm_path"], config["query_token"])
            save_backbone(self.model.backbone, tokenizer, folder)
            logger.info(
                set_color("backbone saved", "blue")
                + f": {folder} (fine-tune a target domain with --pretrained_backbone={folder})"
            )

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.save_resume_state(epoch_idx, train_data)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        batches = tqdm(
            train_data,
            total=len(train_data),
            ncols=100,
            desc=set_color(f"Train {epoch_idx:>5}", "pink"),
            disable=not show_progress,
        )
        total_loss = 0.0
        self.optimizer.zero_grad()
        for batch_idx, interaction in enumerate(batches):
            interaction = interaction.to(self.device)
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = loss_func(interaction)
            self._check_nan(loss)
            total_loss += loss.item()
            scaler.scale((loss + sync_loss) / self.accumulation_steps).backward()
            if (batch_idx + 1) % self.accumulation_steps == 0 or batch_idx + 1 == len(train_data):
                if self.clip_grad_norm:
                    scaler.unscale_(self.optimizer)
                    clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
                scaler.step(self.optimizer)
                scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad()
            batches.set_postfix(loss=f"{total_loss / (batch_idx + 1):.4f}")
        return total_loss

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if self.feature_cache and eval_data:
            eval_data = self.feature_cache.eval_loader(eval_data)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)
