"""The README's Python API flow, on a tiny model: build, fit on pairs, score, generate, save, load."""

import pytest
import torch

import heft
from conftest import make_heft
from heft.api import encode_pairs, score


def test_python_api_flow(tmp_path, tiny_model_dir):
    model = heft.HeftModel.from_pretrained(str(tiny_model_dir))
    pairs = [
        (f"{w} is the passage ? Answer :", " yes" if i % 2 else " no")
        for i, w in enumerate(["cat", "dog", "red", "blue", "green", "one", "two", "three"])
    ]
    before = heft.score(model, [p for p, _ in pairs], [" no", " yes"])
    stages = [
        {"method": "lora", "epochs": 4, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}},
        {"method": "loreft", "epochs": 4, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1"}},
    ]
    progress = heft.fit(model, pairs, stages, batch_size=4, show_progress=False)
    assert progress.optimizer_steps == 2 * 4 * 2 and [s.config.method for s in model.stages] == ["lora", "loreft"]
    after = heft.score(model, [p for p, _ in pairs], [" no", " yes"])
    gold = torch.tensor([i % 2 for i in range(len(pairs))])
    gold_logprob = lambda lp: lp.gather(1, gold[:, None]).mean()  # noqa: E731
    assert gold_logprob(after) > gold_logprob(before)
    texts = heft.generate(model, [pairs[0][0]], max_new_tokens=2)
    assert len(texts) == 1 and isinstance(texts[0], str)
    heft.save_run(model, tmp_path / "run")
    loaded = heft.load_run(tmp_path / "run")
    assert torch.allclose(heft.score(loaded, [p for p, _ in pairs], [" no", " yes"]), after, atol=1e-5)


def test_scoring_and_encoding_refuse_what_they_cannot_do():
    model = make_heft("llama")
    with pytest.raises(ValueError, match="share a first token"):
        score(model, ["is the cat red"], [" red cat", " red dog"])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score(model, ["is the cat red"], [" yes", ""])
    with pytest.raises(ValueError, match=r"pair 1: the target is \d+ tokens; it needs 1 to 3"):
        encode_pairs(model, [("is the cat red", " yes"), ("the cat", " is red and blue")], max_length=4)


@pytest.mark.parametrize("already_unmerged", [False, True])
def test_fit_refuses_a_merge_peft_cannot_do_before_training(monkeypatch, already_unmerged):
    """A LoRA stage cannot merge while an earlier adapter stays unmerged: fit says so before any stage trains."""
    import heft.api as api

    model = make_heft("llama")
    kept = {"method": "lora", "epochs": 1, "lora": {"r": 2, "merge": False}}
    merged = {"method": "lora", "epochs": 1, "lora": {"r": 2}}
    pairs = [("is the cat red", " yes"), ("is the dog blue", " no")]
    if already_unmerged:
        heft.fit(model, pairs, [kept], batch_size=2, show_progress=False)
    monkeypatch.setattr(api, "train_stage", lambda *a, **k: pytest.fail("trained before checking the merge order"))
    stages = [merged] if already_unmerged else [kept, {"method": "loreft", "reft": {"rank": 2}}, merged]
    index = 1 if already_unmerged else 2
    with pytest.raises(
        ValueError, match=rf"stage {index} \(lora\): its LoRA adapter cannot merge while an earlier one stays unmerged"
    ):
        heft.fit(model, pairs, stages, show_progress=False)
