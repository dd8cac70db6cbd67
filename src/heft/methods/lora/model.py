"""Weight-space stages through HF peft: inject, capture, merge. LoRA itself is peft's."""

from __future__ import annotations

import warnings

import peft
import torch
import torch.nn.functional as F
from torch import nn

from heft.methods.lora.config import LoraConfig


def to_peft_config(config: LoraConfig, model: nn.Module) -> peft.LoraConfig:
    """Translate heft's LoraConfig into peft's, field by field.

    peft refuses `layers_to_transform` with a string `target_modules` such as `all-linear`, so in
    that case the shortcut is expanded here to the names of the model's linear layers (all but
    the output embedding, as peft's own `all-linear` does).
    """
    targets = config.target_modules
    if isinstance(targets, str) and config.layers_to_transform is not None:
        if targets != "all-linear":
            raise ValueError(f"layers_to_transform needs target_modules as a list or 'all-linear', got {targets!r}")
        targets = _linear_layer_names(model)
    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=config.layers_to_transform,
        use_dora=config.use_dora,
        modules_to_save=config.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def _linear_layer_names(model: nn.Module) -> list[str]:
    """Names (last component) of the model's linear layers but the output embedding, seen through the
    adapters of earlier unmerged stages: a peft-wrapped `q_proj` counts as `q_proj`, not as its
    `base_layer` and `lora_A.<stage>` parts."""
    head = model.get_output_embeddings()
    head = head.get_base_layer() if isinstance(head, peft.tuners.lora.LoraLayer) else head
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if (
            not isinstance(module, nn.Linear)
            or module is head
            or any(p.startswith("lora_") or p == "modules_to_save" for p in parts)
        ):
            continue
        names.add(parts[-2] if parts[-1] in ("base_layer", "original_module") else parts[-1])
    return sorted(names)


class MaskBitsDropout(nn.Dropout):
    """Inverted dropout whose CPU masks take 16 random bits per element, four per 64-bit draw.

    torch's CPU dropout draws a Bernoulli sample per element through a serial sampler (MKL's
    vectorised one is used on Intel CPUs only); on the adapter inputs of an all-linear LoRA that
    was a quarter of a training step on a 2-core EPYC. Here an element is kept when its 16 bits
    (as int16) reach a threshold, so p is rounded to a multiple of 2⁻¹⁶ (0.05 → 0.0500031) and the
    kept values are scaled by 1/(1 − that p), keeping the expectation exact. Same generator
    (`torch.manual_seed`), other masks than nn.Dropout's. Other devices use `F.dropout` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        keep, scale = self.keep_mask(x)
        return x * keep.to(x.dtype).mul_(scale)

    def keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The elements of `x` to keep (bool, x's shape; a CPU tensor) and the scale of kept values."""
        dropped = round(self.p * 65536)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n].view(x.shape)
        return bits >= dropped - 32768, 65536 / (65536 - dropped)


def use_mask_bits_dropout(model: nn.Module, name: str) -> int:
    """Put MaskBitsDropout in place of peft's nn.Dropout on adapter `name`'s inputs (the module
    peft calls as `lora_dropout[name]`); returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in dropouts and type(dropouts[name]) is nn.Dropout:
            dropouts[name] = MaskBitsDropout(dropouts[name].p)
            replaced += 1
    return replaced


class LoraAdapters:
    """Owns the peft wrapper around a base model across LoRA stages.

    peft injects adapter layers into the model in place, so heft keeps calling the original
    transformers model; the wrapper is kept only for peft's own bookkeeping (state dicts,
    merging, multiple adapters).
    """

    def __init__(self) -> None:
        self.peft_model: peft.PeftModel | None = None
        self.unmerged: list[str] = []
        self.layers: dict[str, list[nn.Module]] = {}
        """Per adapter, the peft layers that hold it (found once, for the fused training forward)."""

    def add(
        self, model: nn.Module, name: str, config: peft.LoraConfig, fast_dropout: bool = False
    ) -> list[nn.Parameter]:
        """Inject adapter `name`; earlier unmerged adapters stay active and frozen. Returns its parameters.
        `fast_dropout`: MaskBitsDropout on the adapter's inputs instead of peft's nn.Dropout."""
        # None: peft would overwrite it from the model (a cache path) with a warning, and later look it
        # up on the Hub when taking state dicts; io.save_run writes the real id into adapter_config.json.
        config.base_model_name_or_path = None
        with warnings.catch_warnings():  # peft probes a property transformers 5 deprecated; nothing to act on
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            if self.peft_model is None:
                self.peft_model = peft.get_peft_model(model, config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
        config.base_model_name_or_path = None
        if fast_dropout:
            use_mask_bits_dropout(self.peft_model, name)
        self.unmerged.append(name)
        self.layers[name] = [
            m for m in self.peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A
        ]
        self.peft_model.base_model.set_adapter(list(self.unmerged))
        params = [p for n, p in self.peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        for n, p in self.peft_model.named_parameters():
            p.requires_grad_(f".{name}." in n or n.endswith(f".{name}"))
        return params

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter weights in peft's file layout (keys without the adapter name)."""
        assert self.peft_model is not None
        state = peft.get_peft_model_state_dict(self.peft_model, adapter_name=name)
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def load_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        assert self.peft_model is not None
        result = peft.set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {name!r} does not match the model: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )

    def merge(self, name: str | None = None) -> nn.Module:
        """Fold adapter `name` (None: every adapter) into the base weights and remove all adapter layers."""
        assert self.peft_model is not None
        if name is not None and self.unmerged != [name]:
            raise ValueError(
                f"cannot merge LoRA stage {name!r} while earlier adapters {self.unmerged[:-1]} stay unmerged; "
                "set merge: true on the earlier LoRA stages or merge: false on this one"
            )
        with warnings.catch_warnings():  # on a quantized base peft warns of rounding; heft measures the loss around it
            warnings.filterwarnings("ignore", message="Merge lora module to (4|8)-bit linear")
            model = self.peft_model.merge_and_unload(adapter_names=list(self.unmerged))
        self.peft_model, self.unmerged, self.layers = None, [], {}
        return model

    def unload_with_deltas(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Remove every adapter without merging. Returns the bare model and, by module name, the sum of
        the unmerged adapters' updates (scale · B·A, float32), for weights that must not be requantized."""
        assert self.peft_model is not None
        deltas: dict[str, torch.Tensor] = {}
        for module_name, module in self.peft_model.base_model.model.named_modules():
            if not isinstance(module, peft.tuners.lora.LoraLayer):
                continue
            for name in self.unmerged:
                if name not in module.lora_A:
                    continue
                if module.use_dora.get(name):
                    raise ValueError(
                        f"adapter {name!r} is DoRA, whose update depends on the weights' norms: it cannot be added to "
                        "dequantized weights as a plain update"
                    )
                delta = module.get_delta_weight(name).float()
                deltas[module_name] = deltas[module_name] + delta if module_name in deltas else delta
        model = self.peft_model.unload()
        self.peft_model, self.unmerged, self.layers = None, [], {}
        return model, deltas

    def discard(self, name: str) -> nn.Module:
        """Remove adapter `name` unmerged (its stage was rolled back); returns the model to keep calling."""
        assert self.peft_model is not None
        self.unmerged.remove(name)
        del self.layers[name]
        if not self.unmerged:
            model = self.peft_model.unload()
            self.peft_model = None
            return model
        self.peft_model.delete_adapter(name)
        self.peft_model.base_model.set_adapter(list(self.unmerged))
        return self.peft_model.get_base_model()
