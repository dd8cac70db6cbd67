"""Configuration of a weight-space stage (LoRA / DoRA through HF peft)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    """Hyperparameters of a LoRA or DoRA adapter; translated 1:1 into `peft.LoraConfig`."""

    r: int = 8
    """Rank of the low-rank update B @ A."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout applied to the adapter input during training."""
    fast_dropout: bool = False
    """Opt-in CPU speed-up: draw the dropout masks from 16 random bits per element (p rounded to a
    multiple of 2^-16, kept values rescaled to keep the expectation), about 2.5x cheaper than torch's
    serial per-element Bernoulli sampler, which took a sixth of a CPU LoRA step. Other masks than
    peft's nn.Dropout (the default), so results differ within noise. No effect on GPU."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or peft's shortcut `all-linear`."""
    layers_to_transform: list[int] | None = None
    """Decoder layer indices to adapt; None adapts every layer."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA). Set implicitly by `method: dora`."""
    merge: bool | None = None
    """Merge the trained adapter into the base weights when the stage ends, so later stages pay
    no adapter overhead. False keeps it as a frozen peft adapter (saved as peft writes it). None
    (default): merge on a full-precision base; on a quantized base (`quantize`), where a merge
    requantizes and rounds the update away, keep it (measured: docs/results/quantized/)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved (peft semantics); usually empty."""
