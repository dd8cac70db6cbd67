"""The short path for Python users: fit stages on (prompt, target) pairs, score choices, generate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator

from heft.config import RunConfig, StageConfig, config_from_dict
from heft.data import pad_batch
from heft.evaluate import autocast
from heft.pipeline import HeftModel
from heft.tasks import EncodedExample
from heft.tasks.base import continuation_ids, first_token_ids
from heft.train import Progress, train_stage


def encode_pairs(model: HeftModel, pairs: Sequence[tuple[str, str]], max_length: int = 512) -> list[EncodedExample]:
    """Tokenise (prompt, target) pairs; the loss will cover the target tokens only."""
    if not pairs:
        return []
    prompts, targets = [prompt for prompt, _ in pairs], [target for _, target in pairs]
    encoded = []
    for i, (prompt_ids, target_ids) in enumerate(
        zip(model.tokenizer(prompts)["input_ids"], continuation_ids(model.tokenizer, prompts, targets))
    ):
        if not 0 < len(target_ids) < max_length:  # the prompt may lose its start, the target nothing
            raise ValueError(
                f"pair {i}: the target is {len(target_ids)} tokens; it needs 1 to {max_length - 1} (max_length - 1)"
            )
        ids = (prompt_ids + target_ids)[-max_length:]
        encoded.append(
            EncodedExample(
                ids, len(ids) - len(target_ids), label=-1, truncated=len(ids) < len(prompt_ids) + len(target_ids)
            )
        )
    return encoded


def fit(
    model: HeftModel,
    pairs: Sequence[tuple[str, str]],
    stages: Sequence[StageConfig | dict],
    batch_size: int = 8,
    seed: int = 0,
    bf16: bool = False,
    max_length: int = 512,
    show_progress: bool = True,
) -> Progress:
    """Add and train `stages` in order on (prompt, target) pairs; returns the budget counters."""
    cfg = RunConfig(batch_size=batch_size, seed=seed, bf16=bf16, max_length=max_length)
    stage_cfgs = [s if isinstance(s, StageConfig) else config_from_dict({"stages": [s]}).stages[0] for s in stages]
    model.check_stages(stage_cfgs, first_index=len(model.stages))
    data = encode_pairs(model, pairs, max_length)
    progress = Progress(stage=len(model.stages))
    for stage_cfg in stage_cfgs:
        model.add_stage(stage_cfg, seed=seed + progress.stage)
        train_stage(model, stage_cfg, data, cfg, Accelerator(), progress, lambda *a: None, show_progress=show_progress)
        model.finish_stage()
        progress.stage, progress.epoch = progress.stage + 1, 0
    return progress


def _prompts(model: HeftModel, prompts: Sequence[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([model.tokenizer(p)["input_ids"] for p in prompts], model.tokenizer.pad_token_id, side)
    return ids.to(model.device), mask.to(model.device)


def score(model: HeftModel, prompts: Sequence[str], choices: Sequence[str], bf16: bool = False) -> torch.Tensor:
    """Log-probabilities (N, C) of each choice's first token after each prompt (the choices tokenised as
    they follow the first prompt: prompts should end alike, e.g. all in "Answer:")."""
    choice_ids = first_token_ids(model.tokenizer, choices, context=prompts[0] if prompts else "")
    with autocast(model, bf16):
        return model.next_token_logprobs(*_prompts(model, prompts, "right"))[:, choice_ids].float().cpu()


def generate(model: HeftModel, prompts: Sequence[str], max_new_tokens: int = 16, bf16: bool = False) -> list[str]:
    """Greedy continuations of `prompts`, with the model's interventions on the prompt tokens."""
    ids, mask = _prompts(model, prompts, "left")
    with autocast(model, bf16):
        out = model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=False)
    return model.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
