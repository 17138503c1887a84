#!/usr/bin/env python
"""Text-to-image decoding speed: code tokens per second with and without the code-slice output
projection (`logits_range`) and with and without the KV cache.

A randomly initialised model (default `ofa_ufo_tiny`, d_model 256, 4+4 layers) with OFA's
vocabulary layout (59,457 ids, 8,192 codes) samples a side x side code grid (top-k 256, as OFA)
for one prompt. The code slice multiplies 8,192 instead of 59,457 rows of the output matrix per
step; the cache avoids re-running the decoder over the whole prefix at every step. Each setting
samples the same codes (same seed), so only the speed differs. Prints one table with ratios.

    python benchmarks/bench_image_gen.py                 # 16x16 codes, ofa_ufo_tiny, 1 thread (about 1 min)
    python benchmarks/bench_image_gen.py --side 32 --model ofa_ufo_medium --repeats 3
"""

from __future__ import annotations

import argparse
import os

import torch

import ofa_ufo
from ofa_ufo.core.timing import device_name, time_call
from ofa_ufo.generation.codes import generate_codes

OFA_VOCAB = dict(vocab_size=59457, code_offset=50265, bin_offset=58457, num_codes=8192)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ofa_ufo_tiny", help="preset name (random weights)")
    parser.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    parser.add_argument("--layers", type=int, default=None, help="override encoder and decoder depth")
    parser.add_argument("--side", type=int, default=16, help="code grid side: side**2 codes (32 = OFA's 256 px)")
    parser.add_argument("--samples", type=int, default=1, help="num_return_sequences per prompt (fastest)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (fastest reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: on a shared "
                        "machine, OpenMP threads that wait for a descheduled sibling make 2-thread timings swing 10x)")
    parser.add_argument("--default-vocab", action="store_true", help="the default tokenizer's vocabulary "
                        "(17,192 ids) instead of OFA's 59,457")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace):
    overrides = {} if args.default_vocab else dict(OFA_VOCAB)
    if args.d_model:
        overrides["d_model"] = args.d_model
    if args.layers:
        overrides.update(encoder_layers=args.layers, decoder_layers=args.layers)
    torch.manual_seed(0)
    return ofa_ufo.create_model(args.model, **overrides).eval()


SETTINGS = [(False, False), (True, False), (False, True), (True, True)]  # (code slice, KV cache)


def run_once(model, inputs, args, side: int, code_slice: bool, use_cache: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one generation of side x side codes, and the codes."""
    config = model.config
    code_range = (config.code_offset, config.code_offset + config.num_codes)
    torch.manual_seed(1)
    codes = []
    seconds = time_call(lambda: codes.append(generate_codes(
        model, inputs, code_range, side, config.eos_token_id, code_slice=code_slice, do_sample=True, top_k=256,
        num_return_sequences=args.samples, use_cache=use_cache)[0]))
    return seconds, codes[0]


def measure(model, inputs, args) -> dict[tuple[bool, bool], float]:
    """Fastest of --repeats runs per setting, the settings interleaved round by round, so that load from
    other processes on a shared machine slows every setting alike and the minimum filters it out."""
    for setting in SETTINGS:
        run_once(model, inputs, args, 2, *setting)  # warm-up
    times: dict[tuple[bool, bool], list[float]] = {setting: [] for setting in SETTINGS}
    reference = None
    for round_ in range(args.repeats):
        for setting in SETTINGS:
            seconds, tokens = run_once(model, inputs, args, args.side, *setting)
            reference = tokens if reference is None else reference
            assert torch.equal(tokens, reference), "the settings must sample the same codes"
            times[setting].append(seconds)
            print(f"  round {round_ + 1}: slice={setting[0]} cache={setting[1]}: {seconds:.2f} s", flush=True)
    return {setting: min(values) for setting, values in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    config = model.config
    prompt = torch.randint(4, 1000, (1, 14), generator=torch.Generator().manual_seed(0))
    prompt[:, 0], prompt[:, -1] = config.bos_token_id, config.eos_token_id
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    codes = args.side**2 * args.samples
    print(f"{args.model}: d_model {config.d_model}, layers {config.encoder_layers}/{config.decoder_layers}, "
          f"vocabulary {config.vocab_size} ({config.num_codes} codes), {args.side}x{args.side} codes x "
          f"{args.samples} sample(s), torch {torch.__version__}; {device_name()}", flush=True)
    load = os.getloadavg()[0]
    best = measure(model, inputs, args)
    rows = [(code_slice, use_cache, best[(code_slice, use_cache)], codes / best[(code_slice, use_cache)])
            for code_slice, use_cache in SETTINGS]
    base = rows[0][3]
    by_key = {(s, c): rate for s, c, _, rate in rows}
    print(f"load average (1 min) before / after: {load:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("\n| code slice | KV cache | s per prompt (fastest) | codes/s | vs full vocab, no cache |")
    print("|---|---|---|---|---|")
    for code_slice, use_cache, seconds, rate in rows:
        print(f"| {'yes' if code_slice else 'no'} | {'yes' if use_cache else 'no'} | {seconds:.2f} | "
              f"{rate:.1f} | {rate / base:.2f}x |")
    print(f"\ncode slice, with cache: {by_key[(True, True)] / by_key[(False, True)]:.2f}x; "
          f"without cache: {by_key[(True, False)] / by_key[(False, False)]:.2f}x")
    print(f"KV cache, with code slice: {by_key[(True, True)] / by_key[(True, False)]:.2f}x; "
          f"full vocab: {by_key[(False, True)] / by_key[(False, False)]:.2f}x")


if __name__ == "__main__":
    main()
