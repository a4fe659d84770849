"""Speed of the feature cache's frozen pass against the bare backbone forward on the same tokens.

    python benchmarks/feature_cache_pass_speed.py --dataset=ml-100k --windows=96

Takes ``--windows`` windows at random from the ones the cache encodes (``train_window: all``
tiling of every history), then, in this one process and on the same batches, times

* the bare backbone forward in float32 and in bfloat16 autocast (inputs assembled beforehand),
* the cache's pass (``feature_cache.encoded_batches``: assembly, forward, gather of the ``[Q]``
  states) in the precision ``feature_cache_dtype: auto`` picks on this machine,

and prints tokens per second, their ratios, the padding share of the batches and how close the
bfloat16 ``[Q]`` states are to float32 (cosine similarity).
"""

import argparse
import time

import torch
from recbole.utils import init_seed

from recbole_st2si.data.windows import tile_windows
from recbole_st2si.feature_cache import cache_dtype, encoded_batches
from recbole_st2si.model import ST2SI
from recbole_st2si.utils import create_config, create_dataset, data_preparation


def window_batches(model, sequences, count, batch_size, seed):
    """``count`` random cache windows as item sequences, and their real token count."""
    users, starts, ends = tile_windows(sequences, model.segment_len, model.max_seq_length, model.max_seq_tokens)
    chosen = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))[:count]
    users, starts, lengths = users[chosen], starts[chosen], (ends - starts)[chosen]
    slots = torch.arange(int(lengths.max()))
    first = sequences.offsets[users] + starts
    seq = sequences.items[(first[:, None] + slots).clamp(max=len(sequences.items) - 1)] * (slots < lengths[:, None])
    return seq, lengths, int(model.segment_len[seq].sum())


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--llm_path", default="embedded")
    parser.add_argument("--windows", type=int, default=96, help="windows timed (each up to 50 items)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = create_config("ST2SI", args.dataset, config_dict={"llm_path": args.llm_path, "train_stage": "ilp",
                                                               "show_progress": False})
    init_seed(config["seed"], True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = ST2SI(config, train_data.dataset).eval()
    seq, lengths, tokens = window_batches(model, train_data.windows.sequences, args.windows, args.batch_size, args.seed)
    dtype = cache_dtype("auto", model.device)

    # the cache's own batches: sorted by token count, as encoded_batches forms them
    order = torch.argsort(model.segment_len[seq].sum(1))
    batches = [order[start : start + args.batch_size] for start in range(0, len(seq), args.batch_size)]
    assembled = []
    for rows in batches:
        width = int(lengths[rows].max())
        input_ids, attention_mask, position_ids, _, _ = model.assemble_inputs(seq[rows, :width], lengths[rows])
        assembled.append((input_ids, attention_mask, position_ids))
    padded = sum(input_ids.numel() for input_ids, _, _ in assembled)

    @torch.inference_mode()
    def bare_forward(precision):
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            for input_ids, attention_mask, position_ids in assembled:
                model.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def cache_pass(precision):
        return torch.cat([states[torch.arange(states.shape[1]) < lengths[rows, None]]
                          for rows, states in encoded_batches(model.frozen_states, model.device, model.segment_len, seq, lengths,
                                                                 args.batch_size, precision, "cache")])

    for precision in (torch.float32, torch.bfloat16):  # warm-up: first-call allocations and kernel selection
        bare_forward(precision)
    seconds = {}
    seconds["bare forward, float32"], _ = timed(lambda: bare_forward(torch.float32))
    seconds["bare forward, bfloat16 autocast"], _ = timed(lambda: bare_forward(torch.bfloat16))
    seconds["cache pass, float32"], fp32_states = timed(lambda: cache_pass(torch.float32))
    cache_label = f"cache pass, {str(dtype).replace('torch.', '')} (auto)"
    seconds[cache_label], auto_states = timed(lambda: cache_pass(dtype))

    print(f"{args.windows} windows of {args.dataset} ({tokens} tokens, {padded} with padding: "
          f"{100 * (padded - tokens) / padded:.1f}% padding), {torch.get_num_threads()} threads, backbone {args.llm_path}")
    for label, value in seconds.items():
        print(f"{label:>36}: {value:7.1f} s, {tokens / value:7.0f} tokens/s")
    bare = seconds["bare forward, float32"]
    print(f"cache pass ({dtype}) / bare float32 forward: {bare / seconds[cache_label]:.2f}x the tokens per second")
    print(f"cache pass float32 / bare float32 forward: {bare / seconds['cache pass, float32']:.2f}x")
    cosine = torch.nn.functional.cosine_similarity(auto_states, fp32_states, dim=1)
    print(f"[Q] states, {dtype} against float32: cosine mean {cosine.mean():.6f}, min {cosine.min():.6f}")


if __name__ == "__main__":
    main()
