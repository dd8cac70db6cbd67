"""Aggregate training throughput of N heft processes sharing one device: what `heft reproduce --jobs N` gains.

Each of N spawned workers loads the model, adds a stage of `heft bench`'s path (LoRA by default), warms
up on its BoolQ batches (compilation and CUDA-graph capture included), then all start together at a
barrier and train for `--seconds`. The tokens they trained, summed, over the window are the aggregate
tokens per second; divided by the tokens of one full-BoolQ epoch, job-epochs per second.

    HEFT_DATA_DIR=... python tools/device/jobs_scaling.py --model MODEL --jobs 1,4,8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

BOOLQ_EPOCH_TOKENS = 1.395e6
"""Training tokens of one epoch over all 9,427 BoolQ examples at max length 512 (docs/results/bench)."""


def worker(args: argparse.Namespace, rank: int, barrier, results) -> None:
    """Train `args.path` on this worker's batches for `args.seconds` after the barrier; put (tokens, seconds)."""
    import torch

    from heft import bench
    from heft.config import RunConfig
    from heft.data import collate, length_grouped_batches, load_data, pad_multiple
    from heft.evaluate import autocast
    from heft.pipeline import HeftModel
    from heft.tasks import get_task

    device = torch.device(args.device)
    model = HeftModel.from_pretrained(args.model).to(device)
    cfg = RunConfig(
        model=args.model,
        task="boolq",
        max_length=args.max_length,
        max_train_examples=args.batches * args.batch_size,
        max_eval_examples=8,
        seed=rank,
    )
    train = load_data(get_task("boolq"), cfg, model.tokenizer).train
    multiple = pad_multiple(args.pad_to_multiple_of, device)
    order = length_grouped_batches([len(e.input_ids) for e in train], args.batch_size, rank)
    pad_id = model.tokenizer.pad_token_id
    collated = [collate([train[i] for i in b], pad_id, "right", multiple) for b in order]
    tokens_of = [int(b["attention_mask"].sum()) for b in collated]  # counted here: no device sync per step
    batches = [{k: v.to(device) for k, v in b.items()} for b in collated]
    model.add_stage(bench.stage_config(args.path), seed=rank)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        with autocast(model, True):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with model.frozen_weights_bf16(), model.compiled_layers(args.compile):
        for batch in batches:  # every shape once: compilation and CUDA graphs before the window
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        barrier.wait()
        tokens, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            step(batches[i % len(batches)])
            tokens += tokens_of[i % len(batches)]
            i += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.put((tokens, time.perf_counter() - start))


def measure(args: argparse.Namespace, jobs: int) -> dict:
    """Aggregate tokens per second of `jobs` workers trained side by side."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    workers = [context.Process(target=worker, args=(args, rank, barrier, results)) for rank in range(jobs)]
    for w in workers:
        w.start()
    done = [results.get() for _ in workers]
    for w in workers:
        w.join()
    tok_s = sum(tokens / seconds for tokens, seconds in done)
    return {"jobs": jobs, "tok_s": round(tok_s), "job_epochs_per_s": tok_s / BOOLQ_EPOCH_TOKENS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--jobs", default="1,4,8", help="comma-separated worker counts, measured in turn")
    ap.add_argument("--path", default="lora", choices=("lora", "loreft", "joint"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=16, help="the full preset's")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batches", type=int, default=12, help="distinct batches per worker (cycled)")
    ap.add_argument("--seconds", type=float, default=20.0, help="the timed window")
    ap.add_argument("--compile", help="as `compile:` in a run config")
    ap.add_argument("--pad-to-multiple-of", default="auto")
    ap.add_argument("--json", help="write the measurements here too")
    args = ap.parse_args()
    if args.pad_to_multiple_of != "auto":
        args.pad_to_multiple_of = int(args.pad_to_multiple_of)
    rows = []
    for jobs in (int(n) for n in args.jobs.split(",")):
        rows.append(measure(args, jobs))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "measurements": rows}, f, indent=2)


if __name__ == "__main__":
    main()
