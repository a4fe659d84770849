"""The feature cache's frozen pass against this machine's limit, measured in one run on the same windows.

    python benchmarks/feature_cache_pass_speed.py --dataset=Scientific --data_path=dataset --windows=256 \
        --output=results/frozen-pass

Takes ``--windows`` windows at random from the ones the cache encodes (``train_window: all`` tiling of
every history), batches them as the cache does (``feature_batch_tokens`` padded tokens per batch) and
times, in this one process:

* the floor: the decoder's matrix products alone, every linear layer of every decoder layer at the
  shapes of these batches (``torch.matmul`` in float32 and bfloat16; ``torch._int_mm`` for int8,
  where the CPU has VNNI or AMX-INT8), as tokens per second; attention's own products, the norms
  and activations are what the floor leaves out;
* the bare backbone forward (inputs assembled beforehand) in float32, under bfloat16 autocast (how
  the cache ran before), with its weights converted to bfloat16 once, and that compiled
  (``torch.compile``, dynamic shapes; its compile time is reported apart);
* the cache's own pass (:class:`~recbole_st2si.feature_cache.FrozenPass`: assembly, forward, gather
  of what is stored), uncompiled and compiled;

and prints, and writes to ``--output`` (``results.csv``, ``README.md``), tokens per second and the
fraction of the bfloat16 floor for each, the padding share, the compile break-even, and how close the
bfloat16 states are to float32 (cosine).
"""

import argparse
import atexit
import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from recbole.utils import init_seed

from recbole_st2si.data.windows import tile_windows
from recbole_st2si.feature_cache import FrozenPass, token_budget_batches
from recbole_st2si.model import ST2SI
from recbole_st2si.run_records import cpu_model
from recbole_st2si.safe_io import write_text
from recbole_st2si.utils import create_config, create_dataset, data_preparation

CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def cpu_flags():
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in present]


def sample_windows(model, sequences, count, seed):
    """``count`` random cache windows as item sequences and their lengths."""
    users, starts, ends = tile_windows(sequences, model.segment_len, model.max_seq_length, model.max_seq_tokens)
    chosen = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))[:count]
    users, starts, lengths = users[chosen], starts[chosen], (ends - starts)[chosen]
    slots = torch.arange(int(lengths.max()))
    first = sequences.offsets[users] + starts
    return sequences.items[(first[:, None] + slots).clamp(max=len(sequences.items) - 1)] * (slots < lengths[:, None]), lengths


def timed(function, repeats=1):
    """Seconds of one call (the least of ``repeats``), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def decoder_linear_shapes(backbone):
    """``(in, out)`` of every linear layer of the decoder's layers, with their count."""
    shapes = [(module.in_features, module.out_features) for module in backbone.layers[0].modules()
              if isinstance(module, torch.nn.Linear)]
    return shapes, len(backbone.layers)


def floor_seconds(shapes, depth, batch_tokens, dtype):
    """Seconds of the decoder's matrix products for batches of ``batch_tokens`` rows each, in ``dtype``."""
    total = 0.0
    for rows in batch_tokens:
        for inputs, outputs in shapes:
            if dtype == torch.int8:
                a = torch.randint(-64, 64, (rows, inputs), dtype=torch.int8)
                b = torch.randint(-64, 64, (inputs, outputs), dtype=torch.int8)
                product = lambda: torch._int_mm(a, b)  # noqa: E731
            else:
                a, b = torch.randn(rows, inputs, dtype=dtype), torch.randn(inputs, outputs, dtype=dtype)
                product = lambda: a @ b  # noqa: E731
            product()
            total += timed(product, repeats=3)[0]
    return total * depth


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (not needed for ml-100k)")
    parser.add_argument("--llm_path", default="embedded")
    parser.add_argument("--windows", type=int, default=256, help="windows timed (each up to 50 items)")
    parser.add_argument("--batch_tokens", type=int, default=None, help="default: the model's feature_batch_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="folder for results.csv and README.md")
    args = parser.parse_args()

    # compile times of a first run, not of kernels that an earlier run left in the on-disk cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = kernels = tempfile.mkdtemp(prefix="st2si-inductor-")
    atexit.register(shutil.rmtree, kernels, ignore_errors=True)
    settings = {"llm_path": args.llm_path, "train_stage": "ilp", "show_progress": False}
    if args.data_path:
        settings["data_path"] = args.data_path
    config = create_config("ST2SI", args.dataset, config_dict=settings)
    init_seed(config["seed"], True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = ST2SI(config, train_data.dataset).eval()
    seq, lengths = sample_windows(model, train_data.windows.sequences, args.windows, args.seed)
    budget = args.batch_tokens or config["feature_batch_tokens"]
    tokens_per_window = model.segment_len[seq].sum(1)
    batches = token_budget_batches(tokens_per_window, budget)
    tokens = int(tokens_per_window.sum())
    assembled = []
    for rows in batches:
        width = int(lengths[rows].max())
        input_ids, attention_mask, position_ids, _, _ = model.assemble_inputs(seq[rows, :width], lengths[rows])
        assembled.append((input_ids, attention_mask, position_ids))
    padded = sum(input_ids.numel() for input_ids, _, _ in assembled)

    shapes, depth = decoder_linear_shapes(model.backbone)
    padded_per_batch = [input_ids.numel() for input_ids, _, _ in assembled]
    seconds, compile_seconds = {}, {}
    for name, dtype in (("floor: matrix products, float32", torch.float32),
                        ("floor: matrix products, bfloat16", torch.bfloat16),
                        *((("floor: matrix products, int8", torch.int8),) if {"avx512_vnni", "amx_int8"} & set(cpu_flags()) else ())):
        seconds[name] = floor_seconds(shapes, depth, padded_per_batch, dtype) * tokens / padded

    bf16_backbone = FrozenPass(model, torch.bfloat16).decoder
    compiled_backbone = torch.compile(bf16_backbone, dynamic=True)

    @torch.inference_mode()
    def forward(backbone, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for input_ids, attention_mask, position_ids in assembled:
                backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    @torch.inference_mode()
    def cache_pass(frozen_pass):
        return torch.cat([frozen_pass(seq[rows, : int(lengths[rows].max())], lengths[rows])
                          [torch.arange(int(lengths[rows].max())) < lengths[rows, None]].float() for rows in batches])

    # The cache pass compiles first, as in a run: the forward's compile after it reuses part of its work.
    compiled_pass = FrozenPass(model, torch.bfloat16, compiled=True)
    compile_seconds["cache pass, bfloat16 weights, compiled"], _ = timed(lambda: cache_pass(compiled_pass))
    compile_seconds["forward, bfloat16 weights, compiled"], _ = timed(lambda: forward(compiled_backbone))
    forward(model.backbone)  # warm-up: first-call allocations and kernel selection
    forward(bf16_backbone)
    seconds["forward, float32"], _ = timed(lambda: forward(model.backbone))
    seconds["forward, bfloat16 autocast"], _ = timed(lambda: forward(model.backbone, autocast=True))
    seconds["forward, bfloat16 weights"], _ = timed(lambda: forward(bf16_backbone))
    seconds["forward, bfloat16 weights, compiled"], _ = timed(lambda: forward(compiled_backbone))
    seconds["cache pass, float32"], fp32_states = timed(lambda: cache_pass(FrozenPass(model, torch.float32)))
    seconds["cache pass, bfloat16 weights"], bf16_states = timed(lambda: cache_pass(FrozenPass(model, torch.bfloat16)))
    seconds["cache pass, bfloat16 weights, compiled"], compiled_states = timed(lambda: cache_pass(compiled_pass))

    floor = tokens / seconds["floor: matrix products, bfloat16"]
    rows = [{"variant": name, "tokens": tokens, "seconds": round(value, 3), "tokens_per_s": round(tokens / value),
             "fraction_of_bf16_floor": round(tokens / value / floor, 3),
             "compile_s": round(compile_seconds[name] - value, 1) if name in compile_seconds else ""}
            for name, value in seconds.items()]
    cosine = {name: torch.nn.functional.cosine_similarity(states, fp32_states, dim=-1)
              for name, states in (("bfloat16", bf16_states), ("bfloat16 compiled", compiled_states))}
    eager, compiled = seconds["cache pass, bfloat16 weights"], seconds["cache pass, bfloat16 weights, compiled"]
    compile_cost = compile_seconds["cache pass, bfloat16 weights, compiled"] - compiled
    break_even = compile_cost / max(eager / tokens - compiled / tokens, 1e-12) if eager > compiled else float("inf")

    machine = (f"{cpu_model()}, {torch.get_num_threads()} torch threads, flags: {' '.join(cpu_flags()) or 'none'}; "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    lines = [
        f"{args.windows} windows of {args.dataset}: {tokens} tokens, {padded} with padding "
        f"({100 * (padded - tokens) / padded:.1f}% padding) in {len(batches)} batches of at most {budget} tokens; "
        f"backbone {args.llm_path}; windows tile each history, so no token is computed twice",
        f"machine: {machine}",
        "",
        "| variant | tokens/s | fraction of the bf16 floor | seconds | compile (s) |",
        "|---|---|---|---|---|",
        *(f"| {row['variant']} | {row['tokens_per_s']:,} | {row['fraction_of_bf16_floor']:.2f} | {row['seconds']} | "
          f"{row['compile_s']} |" for row in rows),
        "",
        "states against float32 (cosine, mean / min): " + "; ".join(
            f"{name} {values.mean():.5f} / {values.min():.5f}" for name, values in cosine.items()),
        f"compiling the cache pass pays from {break_even:,.0f} tokens on (compile {compile_cost:.0f} s, "
        f"{eager / compiled:.2f}x the uncompiled tokens/s)",
    ]
    print("\n".join(lines))
    if args.output:
        folder = Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "results.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        command = " ".join(["python", *sys.argv])
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        write_text(folder / "README.md", f"# The frozen pass against this machine's limit\n\nWritten by `{command}` on "
                   f"{date}.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
