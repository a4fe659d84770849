r"""ST2SI: sequence item texts to sequence item IDs.

A user's history ``v1 .. vn`` is written as ``T1 [Q] T2 [Q] ... Tn [Q]`` (``Ti`` the tokens of item
``vi``'s text) and read by a decoder-only language model. The last hidden state at every ``[Q]``
goes through the item linear projection (ILP, ``hidden -> n_items``) and predicts the next item
(multi-query input: every transition of the sequence in one forward pass). ID-alignment samples
``prompt + Ti + [Q] -> vi`` share the same objective.

Reference: "Learning Transition Patterns by Large Language Models for Sequential Recommendation".
"""

import copy

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_st2si.backbone import (
    hidden_size,
    load_backbone,
    load_backbone_weights,
    load_tokenizer,
    padding_token_id,
)
from recbole_st2si.compiling import Compiled
from recbole_st2si.errors import UserInputError

TRAIN_STAGES = ("full", "ilp", "top", "lora", "pretrain")
SPLIT_DECODERS = ("llama", "mistral", "qwen2", "qwen3")  # decoders whose top layers run on given hidden states

# Interaction fields of batches whose frozen part was computed ahead (the feature cache):
QUERY_STATES = "query_states"
"""``[B, H]``: each row's ``[Q]`` state, for a backbone that trains nothing (``ilp``)."""
TOKEN_STATES = "token_states"
"""``[B, S, H]``: the hidden states entering the first trained layer (``top``) of each row's tokens,
right-padded; ``TOKEN_COUNT`` ``[B]`` says how many are real."""
TOKEN_COUNT = "token_count"
QUERY_POSITIONS = "query_positions"
"""``[B, L]``: in a training batch of token states, the token index of every ``[Q]``, and in
``QUERY_TARGETS`` the item each predicts (0: none, the query does not train)."""
QUERY_TARGETS = "query_targets"
QUERY_ITEMS = "query_items"
"""In a training batch of cached states: the item whose ``[Q]`` each query is (0: an alignment
prompt's), for ``id_embedding`` (``[N]`` with :data:`QUERY_STATES`, ``[B, L]`` with :data:`TOKEN_STATES`)."""
PRETRAINED_ILP_LEARNING_RATE = 1e-4  # the authors' rate for ILP-only tuning after pre-training


def auto_train_stage(device_type):
    """What ``train_stage: auto`` means on a device: ``full`` on a GPU, ``ilp`` on CPU, where
    fine-tuning a language model is impractically slow."""
    return "full" if device_type == "cuda" else "ilp"


def resolve_auto_settings(config):
    """Fill the settings whose default depends on the machine or on other settings.

    ``train_stage: auto`` becomes :func:`auto_train_stage` of the run's device; ``ilp_learning_rate: ~`` follows ``learning_rate`` when
    the whole backbone trains; when it is frozen, or only its top layers train, it is ``frozen_ilp_learning_rate``
    (the authors' 3e-4 by default, tuned per dataset in ``dataset_configs/``), or the authors' lower rate after
    pre-training.
    """
    if config["train_stage"] == "auto":
        config["train_stage"] = auto_train_stage(config["device"].type)
    if config["ilp_learning_rate"] is None:
        if config["train_stage"] not in ("ilp", "top"):
            config["ilp_learning_rate"] = config["learning_rate"]
        elif config["pretrained_backbone"]:
            config["ilp_learning_rate"] = PRETRAINED_ILP_LEARNING_RATE
        else:
            config["ilp_learning_rate"] = config["frozen_ilp_learning_rate"]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the ILP scores ``states @ weight.T`` (float32) over items ``1 ..``
    (padding item 0 is never a candidate), computed chunk by chunk of ``chunk_size`` items.

    The forward pass keeps one log-sum-exp per query; the backward pass recomputes each chunk's
    scores, so memory grows with queries x chunk, never with queries x items.
    """

    @staticmethod
    def forward(ctx, states, weight, targets, chunk_size):
        with torch.autocast(states.device.type, enabled=False):
            features, rows = states.float(), weight.float()
            log_norm = torch.full((len(features),), float("-inf"), device=features.device)
            for start in range(1, len(rows), chunk_size):
                chunk_scores = features @ rows[start : start + chunk_size].T
                log_norm = torch.logaddexp(log_norm, torch.logsumexp(chunk_scores, dim=1))
            target_scores = (features * rows[targets]).sum(1)
        ctx.save_for_backward(states, weight, targets, log_norm)
        ctx.chunk_size = chunk_size
        return (log_norm - target_scores).mean()

    @staticmethod
    def backward(ctx, grad_output):
        states, weight, targets, log_norm = ctx.saved_tensors
        with torch.autocast(states.device.type, enabled=False):
            features, rows = states.float(), weight.float()
            scale = grad_output.float() / len(features)
            grad_features = -scale * rows[targets]
            grad_rows = torch.zeros_like(rows)
            grad_rows.index_add_(0, targets, -scale * features)
            for start in range(1, len(rows), ctx.chunk_size):
                chunk = rows[start : start + ctx.chunk_size]
                probabilities = torch.exp(features @ chunk.T - log_norm[:, None]) * scale
                grad_features += probabilities @ chunk
                grad_rows[start : start + len(chunk)] += probabilities.T @ features
        return grad_features.to(states.dtype), grad_rows.to(weight.dtype), None, None


def gather_queries(hidden, query_pos):
    """``[B, L, H]``: the hidden states ``[B, S, H]`` at each ``[Q]`` (``query_pos``, ``[B, L]``; -1: none)."""
    return hidden.gather(1, query_pos.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))


def merge_top_k(best_scores, best_items, scores, first_item, k):
    """Fold one chunk of scores (items ``first_item ..``) into a running top-k."""
    items = torch.arange(first_item, first_item + scores.shape[1], device=scores.device).expand_as(scores)
    scores, items = torch.cat([best_scores, scores], 1), torch.cat([best_items, items], 1)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, items.gather(1, top.indices)


def mask_items(scores, items, first_item=0):
    """Set to -inf the scores of ``items`` (``[B, L]`` ids, 0 = none) in a chunk of scores that starts
    at item ``first_item``; item 0 is padding and never a candidate anyway."""
    column = items - first_item
    inside = (items > 0) & (column >= 0) & (column < scores.shape[1])
    rows = torch.arange(len(items), device=items.device)[:, None].expand_as(items)
    scores[rows[inside], column[inside]] = float("-inf")
    return scores


def split_decoder(backbone, trained_layers):
    """The backbone as a lower and an upper decoder sharing its modules: the lower one runs the
    frozen layers and returns the hidden states entering the first of the ``trained_layers`` top
    layers; the upper one runs those layers, with their rotary positions and causal mask, and the
    final norm, on given hidden states. Without trained layers: the backbone itself, and nothing above."""
    if not trained_layers:
        return backbone, None
    if backbone.config.model_type not in SPLIT_DECODERS:
        raise UserInputError(f"train_stage top runs the top layers on their own, which this backbone "
                             f"({backbone.config.model_type}) does not allow; use one of {', '.join(SPLIT_DECODERS)}")
    depth = len(backbone.layers)
    if trained_layers >= depth:
        raise UserInputError(f"top_layers={trained_layers} must be below the backbone's {depth} layers (use full)")

    def view(layers, norm):
        part = copy.copy(backbone)
        part._modules = dict(backbone._modules)  # its own list of layers, the same layers
        part.layers, part.norm = nn.ModuleList(layers), norm
        return part

    return view(backbone.layers[:-trained_layers], nn.Identity()), view(backbone.layers[-trained_layers:], backbone.norm)


def with_lora_adapters(backbone, config):
    """Wrap the backbone with LoRA adapters (``peft``); only they and the ILP are trained."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=config["lora_target_modules"],
    )
    try:
        return get_peft_model(backbone, lora)
    except ValueError as error:
        raise UserInputError(f"LoRA cannot be applied to this backbone: {error} (set lora_target_modules)") from None


class ST2SI(SequentialRecommender):
    input_type = InputType.POINTWISE
    train_stages = TRAIN_STAGES  # a benchmark runs one row per stage
    resolve_settings = staticmethod(resolve_auto_settings)  # settings that depend on the machine

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.USER_ID = config["USER_ID_FIELD"]
        self.train_stage = config["train_stage"]
        self.trained_layers = config["top_layers"] if self.train_stage == "top" else 0
        self.multi_query = config["multi_query"]
        self.max_seq_tokens = config["max_seq_tokens"]
        self.ilp_chunk_size = config["ilp_chunk_size"] or None
        if self.max_seq_length < 2:
            raise UserInputError("MAX_ITEM_LIST_LENGTH must be at least 2 (alignment samples use two slots)")

        tokenizer, self.query_token_id = load_tokenizer(config["llm_path"], config["query_token"])
        self.pad_token_id = padding_token_id(tokenizer)
        self.backbone = load_backbone(config["llm_path"], tokenizer)
        if config["pretrained_backbone"]:
            load_backbone_weights(self.backbone, config["pretrained_backbone"], config["llm_path"])
        self.ilp = nn.Linear(hidden_size(self.backbone), self.n_items, bias=False)
        self.item_embedding = None
        if config["id_embedding"]:  # beyond the paper: starts at zero, i.e. as the text-only model
            self.item_embedding = nn.Embedding(self.n_items, self.ilp.in_features, padding_idx=0)
            nn.init.zeros_(self.item_embedding.weight)
        self.item_tokens = [str(token) for token in dataset.field2id_token[dataset.iid_field]]

        prompt = tokenizer.encode(config["alignment_prompt"], add_special_tokens=False)
        segment_tokens, segment_len = self._segment_table(dataset.item_token_ids, dataset.item_token_len, prompt)
        if int(segment_len.max()) >= self.max_seq_tokens:
            raise UserInputError(
                f"max_seq_tokens={self.max_seq_tokens} must exceed the longest item text (+[Q]) or alignment "
                f"prompt ({int(segment_len.max())} tokens)"
            )
        # Not persistent: they are derived from the dataset and tokenizer, not learned.
        self.register_buffer("segment_tokens", segment_tokens, persistent=False)
        self.register_buffer("segment_len", segment_len, persistent=False)
        self.prompt_item_id = self.n_items

        if self.train_stage in ("ilp", "top"):
            self.backbone.requires_grad_(False)
        elif self.train_stage == "lora":
            self.backbone = with_lora_adapters(self.backbone, config)
        self.decoder_split = split_decoder(self.backbone, self.trained_layers)  # a tuple: not registered twice
        if self.upper_decoder is not None:
            self.upper_decoder.layers.requires_grad_(True)
            self.upper_decoder.norm.requires_grad_(True)

    def compile_trained_layers(self):
        """Run the trained top layers compiled (:class:`~recbole_st2si.compiling.Compiled`): on a CPU
        most of an epoch of ``top`` is theirs, and half of that the element-wise work compiling fuses."""
        self.decoder_split = (self.lower_decoder, Compiled(self.upper_decoder))

    @property
    def lower_decoder(self):
        return self.decoder_split[0]

    @property
    def upper_decoder(self):
        return self.decoder_split[1]

    def _segment_table(self, item_tokens, item_len, prompt):
        """Token table of every input segment: item ``i``'s text followed by ``[Q]``, and, at row
        ``n_items``, the alignment prompt (no ``[Q]``: nothing is predicted after the prompt)."""
        width = max(item_tokens.shape[1] + 1, len(prompt))
        table = torch.full((self.n_items + 1, width), self.pad_token_id, dtype=torch.long)
        table[: self.n_items, : item_tokens.shape[1]] = item_tokens
        table[torch.arange(1, self.n_items), item_len[1:]] = self.query_token_id
        table[self.n_items, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        lengths = torch.cat([item_len + 1, torch.tensor([len(prompt)])])
        lengths[0] = 0
        return table, lengths

    def train(self, mode=True):
        super().train(mode)
        if self.train_stage in ("ilp", "top"):
            self.backbone.eval()  # frozen: no dropout, so its outputs are a fixed function of the input
            if self.upper_decoder is not None:
                self.upper_decoder.layers.train(mode)
        return self

    # ------------------------------------------------------------------ token assembly
    def assemble_inputs(self, item_seq, item_seq_len):
        """Write each history as right-padded ``T1 [Q] ... Tn [Q]`` token ids, with tensor ops only.

        Right, not left, padding: under the causal mask every padding position then still sees the
        real tokens before it. A left-padded query row sees nothing at all, which CUDA attention
        kernels answer with NaN; the NaN never reaches a ``[Q]`` state, but in the backward pass
        NaN x 0 gradients turn every backbone weight into NaN. For the real tokens both layouts are
        the same computation (same positions, same visible keys).

        ``item_seq`` is RecBole's ``[B, L]`` left-aligned, zero-padded item list. As in the authors'
        code, the most recent items are kept while their tokens stay below ``max_seq_tokens``.

        Returns:
            input_ids, attention_mask, position_ids: ``[B, S]`` backbone inputs;
            query_pos: ``[B, L]`` index of the ``[Q]`` after each item (last token of its segment);
            kept: ``[B, L]`` whether the item is in the input.
        """
        batch, slots = item_seq.shape
        device = item_seq.device
        present = torch.arange(slots, device=device) < item_seq_len[:, None]
        seg_len = self.segment_len[item_seq] * present
        tokens_from_here = seg_len.flip(1).cumsum(1).flip(1)
        kept = present & (tokens_from_here < self.max_seq_tokens)
        seg_len = seg_len * kept
        seg_end = seg_len.cumsum(1)
        total = seg_end[:, -1]
        width = int(total.max())

        segment_tokens = self.segment_tokens[item_seq]  # [B, L, T]
        offsets = torch.arange(segment_tokens.shape[2], device=device)
        in_segment = offsets < seg_len[..., None]
        dest = (seg_end - seg_len)[..., None] + offsets
        rows = torch.arange(batch, device=device)[:, None, None].expand_as(dest)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
        input_ids[rows[in_segment], dest[in_segment]] = segment_tokens[in_segment]

        positions = torch.arange(width, device=device)
        attention_mask = positions < total[:, None]
        position_ids = positions.expand(batch, -1)
        query_pos = seg_end - 1
        return input_ids, attention_mask.long(), position_ids, query_pos, kept

    def query_states(self, item_seq, item_seq_len):
        """Last hidden states at every ``[Q]``: ``[B, L, H]`` and the mask of real queries ``[B, L]``
        (padding slots, dropped items and the alignment prompt are not queries)."""
        input_ids, attention_mask, position_ids, query_pos, kept = self.assemble_inputs(item_seq, item_seq_len)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.upper_decoder is None):
            hidden = self.lower_decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = self.upper_states(hidden.last_hidden_state, attention_mask, position_ids)
        return gather_queries(hidden, query_pos), kept & (item_seq != self.prompt_item_id)

    def frozen_states(self, item_seq, item_seq_len, decoder=None):
        """What the frozen part of the backbone computes, as the feature cache stores it: with trained
        top layers, the states entering the first of them for every token (``[B, S, H]``); without,
        the last hidden state at every ``[Q]`` (``[B, L, H]``). ``decoder``: the frozen part to run
        (a copy prepared for a long pass, see :class:`~recbole_st2si.feature_cache.FrozenPass`)."""
        input_ids, attention_mask, position_ids, query_pos, _ = self.assemble_inputs(item_seq, item_seq_len)
        decoder = self.lower_decoder if decoder is None else decoder
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return hidden if self.trained_layers else gather_queries(hidden, query_pos)

    def upper_states(self, hidden, attention_mask, position_ids=None):
        """The last hidden states from the states entering the first trained layer (``top``); for
        other stages these are the last hidden states already."""
        if self.upper_decoder is None:
            return hidden
        return self.upper_decoder(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state

    def query_targets(self, item_seq, item_seq_len, target):
        """The item each ``[Q]`` predicts: the next item in the sequence, and ``target`` after the last."""
        targets = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
        last = (item_seq_len - 1)[:, None]
        return targets.scatter(1, last, target[:, None])

    def item_logits(self, states, first_item=0, end_item=None):
        """ILP scores of every item (or of items ``first_item .. end_item - 1``) in float32, also under
        autocast: in bf16 many of the scores of a large catalogue would tie. The padding item 0 is
        never a candidate."""
        with torch.autocast(states.device.type, enabled=False):
            logits = F.linear(states.float(), self.ilp.weight[first_item:end_item].float())
        if first_item > 0:
            return logits
        return logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), float("-inf"))

    def ilp_loss(self, states, targets):
        """Cross-entropy of the ILP scores; over item chunks of ``ilp_chunk_size`` when the catalogue
        is larger, so that a million items fit in memory."""
        if self.ilp_chunk_size and self.ilp_chunk_size < self.n_items:
            return ChunkedCrossEntropy.apply(states, self.ilp.weight, targets, self.ilp_chunk_size)
        return F.cross_entropy(self.item_logits(states), targets)

    @torch.no_grad()
    def top_items(self, states, k, exclude=None):
        """The ``k`` best items of each state and their float32 scores, ``[B, k]`` each, computed over
        item chunks of ``ilp_chunk_size``; ``exclude`` (``[B, L]`` item ids, 0 = none) are never ranked."""
        chunk = self.ilp_chunk_size or self.n_items
        best_scores = states.new_empty((len(states), 0), dtype=torch.float32)
        best_items = torch.empty((len(states), 0), dtype=torch.long, device=states.device)
        for start in range(0, self.n_items, chunk):
            scores = self.item_logits(states, start, start + chunk)
            if exclude is not None:
                scores = mask_items(scores, exclude, start)
            best_scores, best_items = merge_top_k(best_scores, best_items, scores, start, k)
        return best_scores, best_items

    def head_parameters(self):
        """What scores a ``[Q]`` state besides the backbone: the ILP and, with ``id_embedding``, the item embedding."""
        return [*self.ilp.parameters(), *(self.item_embedding.parameters() if self.item_embedding is not None else [])]

    def with_item_ids(self, states, items):
        """``states`` plus the learned embedding of the item whose ``[Q]`` each is (``id_embedding``,
        beyond the paper: the ID-based transition from that item, next to what the text gives); item 0
        adds nothing."""
        if self.item_embedding is None:
            return states
        return states + self.item_embedding(items)

    def query_items(self, item_seq):
        """The item whose ``[Q]`` each slot is; 0 in the alignment samples (their ``[Q]`` names the target)."""
        return torch.where(item_seq[:, :1] == self.prompt_item_id, 0, item_seq)

    # ------------------------------------------------------------------ RecBole interface
    def forward(self, item_seq, item_seq_len):
        """The state the ILP scores after each sequence: its last ``[Q]`` (with its item's embedding
        under ``id_embedding``): ``[B, H]``."""
        states, _ = self.query_states(item_seq, item_seq_len)
        last = item_seq_len - 1
        return self.with_item_ids(self.gather_indexes(states, last), item_seq.gather(1, last[:, None]).squeeze(1))

    def token_states(self, interaction):
        """The last hidden states of a batch of :data:`TOKEN_STATES`, computed by the trained layers."""
        tokens, count = interaction[TOKEN_STATES], interaction[TOKEN_COUNT]
        mask = torch.arange(tokens.shape[1], device=tokens.device) < count[:, None]
        return self.upper_states(tokens, mask.long()), count

    def held_out_states(self, interaction):
        """The state the ILP scores after each row's history: from the frozen part computed ahead
        (:data:`QUERY_STATES`, :data:`TOKEN_STATES`), or by the whole backbone (:meth:`forward`)."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if QUERY_STATES in interaction:
            states = interaction[QUERY_STATES]
        elif TOKEN_STATES in interaction:  # the row's last token is the [Q] before its held-out item
            hidden, count = self.token_states(interaction)
            states = hidden[torch.arange(len(hidden), device=hidden.device), count - 1]
        else:
            return self.forward(item_seq, item_seq_len)
        return self.with_item_ids(states, item_seq.gather(1, (item_seq_len - 1)[:, None]).squeeze(1))

    def calculate_loss(self, interaction):
        if QUERY_STATES in interaction:  # one state per transition, computed ahead
            states = self.with_item_ids(interaction[QUERY_STATES], interaction[QUERY_ITEMS])
            return self.ilp_loss(states, interaction[self.POS_ITEM_ID])
        if TOKEN_STATES in interaction:  # windows of token states entering the trained layers
            hidden, _ = self.token_states(interaction)
            states = gather_queries(hidden, interaction[QUERY_POSITIONS])
            targets = interaction[QUERY_TARGETS]
            trains = targets > 0
            return self.ilp_loss(self.with_item_ids(states[trains], interaction[QUERY_ITEMS][trains]), targets[trains])
        target = interaction[self.POS_ITEM_ID]
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        states, is_query = self.query_states(item_seq, item_seq_len)
        targets = self.query_targets(item_seq, item_seq_len, target)
        if not self.multi_query:
            is_query = is_query & (torch.arange(item_seq.shape[1], device=item_seq.device) == (item_seq_len - 1)[:, None])
        states = self.with_item_ids(states[is_query], self.query_items(item_seq)[is_query])
        return self.ilp_loss(states, targets[is_query])

    def full_sort_predict(self, interaction):
        return self.item_logits(self.held_out_states(interaction))

    def predict(self, interaction):
        """Scores of sampled candidates (e.g. ``uni19``). RecBole repeats a user's history once per
        candidate row; each distinct history goes through the backbone once."""
        if QUERY_STATES in interaction:
            return self.candidate_scores(self.held_out_states(interaction), interaction[self.ITEM_ID])
        if TOKEN_STATES in interaction:  # every candidate row carries its user's tokens: run each user once
            users, row_user = torch.unique(interaction[self.USER_ID], return_inverse=True)
            rows = torch.arange(len(row_user), device=row_user.device)
            first_row = torch.full_like(users, len(rows)).scatter_reduce(0, row_user, rows, "amin")
            states = self.held_out_states(interaction[first_row])
            return self.candidate_scores(states[row_user], interaction[self.ITEM_ID])
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        histories, row_history = torch.unique(torch.cat([item_seq, item_seq_len[:, None]], 1), dim=0, return_inverse=True)
        states = self.forward(histories[:, :-1], histories[:, -1])
        return self.candidate_scores(states[row_history], interaction[self.ITEM_ID])

    def candidate_scores(self, states, items):
        """The ILP score of item ``items[i]`` for state ``states[i]``, in float32."""
        return (states.float() * self.ilp.weight[items].float()).sum(-1)
