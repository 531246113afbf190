"""Training data: corpora, a byte-level BPE tokenizer, packing, an on-disk cache.

Corpora (``DataConfig.kind``):
- ``stdlib``: the ``.py`` sources of the running interpreter's standard
  library (tests and IDLE left out): real text nobody here wrote, present on
  every machine, so the default recipes need no download;
- ``text``: local files or globs (``.txt`` one document per file; ``.jsonl``
  and ``.parquet`` one document per row, text in ``text_field``);
- ``hf``: ``datasets.load_dataset(name)`` for a hub name or a local copy,
  read as a stream with ``streaming: true`` (nothing downloaded whole;
  ``max_tokens`` takes the first N tokens of a corpus of any size);
- ``mqar``: generated multi-query associative recall examples (see
  ``kvlab.recipes.mqar``): token ids are the task, no tokenizer.

Every corpus is read a batch of documents at a time and never held whole,
so one larger than memory tokenizes in bounded memory. Documents are split
into train/val by a hash of their name, so the split is the same on every
machine and run. The tokenizer is trained on the train split (``tokenizers``
byte-level BPE; the first ``tokenizer_docs`` documents) unless one is given
by path. Each split is one stream of token ids on disk, documents joined by
an EOS token, memory-mapped and cut into rows of ``seq_len + 1`` tokens when
read (``PackedRows``), so any ``seq_len`` reads the same cache; the
boundaries stay recoverable from the EOS tokens, which is how ``doc_ids``
are made for per-document attention (``doc_mask``). With ``context: C`` rows
are ``C + seq_len + 1`` tokens: the first C are the row's context (a model
with a context encoder, CEPE or XC-Cache, encodes it; any other reads it in
its prompt), and the model is scored on the ``seq_len`` that continue it.

The tokenizer and the streams are cached under ``cache_dir``, keyed by the
corpus, the split and the tokenizer, so a second run with the same data
starts in seconds. The training order is a seeded permutation of the rows
(``ResumableSampler``): a resumed run continues from the row where the
killed one stopped, whatever the corpus's size.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kvlab._config import differences
from kvlab._io import atomic_path, remove_orphans
from kvlab.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

_LEGACY_TMP = re.compile(r"^[a-z]+-[0-9a-f]{16}\.tmp(\d+)$")  # the cache's temporaries before kvlab._io
# 3: documents of no text left out; 2: one token stream per split; 1 (no key): datasets' token ids and packed rows
CACHE_FORMAT = 3
DATA_KINDS = ("stdlib", "text", "hf", "mqar")


def default_cache_dir() -> str:
    return os.environ.get("KVLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvlab"))


@dataclass
class DataConfig:
    kind: str = "stdlib"
    paths: list[str] = field(default_factory=list)  # kind=text: files or globs
    name: str | None = None  # kind=hf: dataset name or local path for load_dataset
    subset: str | None = None  # kind=hf: configuration name
    streaming: bool = False  # kind=hf: read the dataset as a stream (nothing downloaded whole), see max_tokens
    max_tokens: int | None = None  # stop reading the corpus once the train split has this many tokens
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.05
    max_docs: int | None = None  # keep at most this many documents (before the split): quick runs
    tokenizer: str | None = None  # tokenizer.json or an HF tokenizer directory; None: train one
    tokenizer_docs: int | None = None  # train the tokenizer on the first N train documents (None: all)
    vocab_size: int = 4096  # for a trained tokenizer; kind=mqar: the task's vocabulary
    mqar_pairs: int = 8  # kind=mqar: key-value pairs per example, each queried once
    mqar_examples: int = 10000  # kind=mqar: training examples (validation: mqar_val_examples)
    mqar_val_examples: int = 500
    doc_mask: bool = False  # attend within documents only, positions restarting at each
    context: int = 0  # tokens before each row's seq_len given as its context (encoded, or read in the prompt)
    num_workers: int = 0
    cache_dir: str | None = None  # None: $KVLAB_CACHE or ~/.cache/kvlab

    def validate(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={self.kind!r} is not one of {', '.join(DATA_KINDS)}")
        if self.kind == "text" and not self.paths:
            raise ValueError("data.paths is empty; data.kind=text needs files or globs")
        if self.kind == "hf" and not self.name:
            raise ValueError("data.name is not set; data.kind=hf needs a dataset name or path")
        for name in ("seq_len", "batch_size", "vocab_size", "mqar_pairs", "mqar_examples", "mqar_val_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"data.context={self.context!r} must be a number of tokens >= 0 (0: no context)")
        if self.context and (self.doc_mask or self.kind == "mqar"):
            what = "data.doc_mask=true packs documents per row" if self.doc_mask else "data.kind=mqar rows are tasks"
            raise ValueError(f"data.context={self.context} splits each row into context and continuation; {what}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        for name in ("max_docs", "max_tokens", "tokenizer_docs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1, or null for no limit")
        if self.streaming and self.kind != "hf":
            raise ValueError(f"data.streaming=true is for data.kind=hf, not {self.kind!r} (local files are always "
                             "read a batch at a time)")  # fmt: skip
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0 (0 loads in the main process)")
        if not self.text_field:
            raise ValueError("data.text_field is empty; name the column that holds the text")


# -- corpora --------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def text_files(patterns: list[str]) -> list[str]:
    """The files matched by ``data.paths``; a pattern matching nothing is an error."""
    files = set()
    for pattern in patterns:
        matched = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matched:
            raise FileNotFoundError(f"data.paths: no file matches {pattern!r}")
        files.update(matched)
    return sorted(files)


def _is_val(name: str, fraction: float) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


class CorpusError(ValueError):
    """A corpus that cannot be read as configured (told apart from the parse errors of ``datasets``, which are
    ``ValueError`` s too)."""


def iter_documents(
    cfg: DataConfig, batch_size: int = 1000, blank: list | None = None
) -> Iterator[list[tuple[str, str]]]:
    """The corpus in its order, as batches of ``(name, text)``: read a batch at a time (a file, or a batch of rows
    of a ``.jsonl``/``.parquet`` file or dataset), so a corpus larger than memory is never held whole.

    Documents of no text but whitespace are left out (their names appended to ``blank``): each would be a lone
    end-of-text token in the stream, and datasets such as wikitext hold a third of their rows empty."""
    seen = 0
    for read in _document_batches(cfg, batch_size):
        batch = []
        for name, text in read:
            if text and not text.isspace():  # (isspace: no stripped copy of a long document)
                batch.append((name, text))
            elif blank is not None:
                blank.append(name)
        if cfg.max_docs is not None:
            batch = batch[: cfg.max_docs - seen]
        seen += len(batch)
        if batch:
            yield batch
        if cfg.max_docs is not None and seen >= cfg.max_docs:
            return


def _document_batches(cfg: DataConfig, batch_size: int) -> Iterator[list[tuple[str, str]]]:
    if cfg.kind == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files()
        for i in range(0, len(files), batch_size):
            yield [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace"))
                   for p in files[i : i + batch_size]]  # fmt: skip
    elif cfg.kind == "text":
        yield from _local_batches(text_files(cfg.paths), cfg.text_field, batch_size)
    else:
        import datasets

        ds = datasets.load_dataset(cfg.name, cfg.subset, split="train", streaming=cfg.streaming)
        i = 0
        for rows in _rows(ds, cfg.text_field, batch_size, where=cfg.name):
            yield [(f"{cfg.name}/{i + j}", text) for j, text in enumerate(rows)]
            i += len(rows)


def _rows(ds, text_field: str, batch_size: int, where: str) -> Iterator[list[str]]:
    """The ``text_field`` column of a dataset (in memory, on disk or streamed), a batch at a time; a missing
    column or a row that is not text is an error naming ``where`` (and the row)."""
    i = 0
    for batch in ds.iter(batch_size=batch_size):
        if text_field not in batch:
            raise CorpusError(f"data.text_field={text_field!r} is not a column of {where}: {list(batch)}")
        for j, text in enumerate(batch[text_field]):
            if not isinstance(text, str):
                raise CorpusError(f"data.paths: {where}, row {i + j}: data.text_field={text_field!r} is {text!r}, "
                                 "not text")  # fmt: skip
        i += len(batch[text_field])
        yield batch[text_field]


def _local_batches(files: list[str], text_field: str, batch_size: int) -> Iterator[list[tuple[str, str]]]:
    """One document per ``.txt``/``.md`` file, or per row of each ``.jsonl``/``.json``/``.parquet`` file."""
    import datasets

    kinds = {}
    for f in files:
        suffix = Path(f).suffix.lower()
        kinds[f] = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kinds[f] is None:
            raise ValueError(f"data.paths: {f} has suffix {suffix!r}; use .txt/.md, .jsonl/.json or .parquet")
    # Documents are named relative to the corpus's common directory, so the train/val split
    # (a hash of the name) is the same wherever the corpus is copied.
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    batch = []
    for f in files:
        name = os.path.relpath(os.path.abspath(f), base)
        if kinds[f] == "text":
            try:
                batch.append((name, Path(f).read_text(encoding="utf-8")))
            except UnicodeDecodeError as e:
                raise ValueError(f"data.paths: {f} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        else:
            rows = datasets.load_dataset(kinds[f], data_files=[f], split="train", streaming=True)
            i = 0
            try:
                for texts in _rows(rows, text_field, batch_size, where=f):
                    batch.extend((f"{name}#{i + j}", text) for j, text in enumerate(texts))
                    i += len(texts)
                    if len(batch) >= batch_size:
                        yield batch
                        batch = []
            except CorpusError:
                raise
            except Exception as e:  # datasets wraps parse errors in its own types
                cause = e.__cause__ or e
                raise ValueError(f"data.paths: {f} could not be read as {kinds[f]}: {cause}") from None
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- tokenizer ------------------------------------------------------------------


# -- packing and the on-disk cache ---------------------------------------------


def doc_ids_from_tokens(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Document index of each position: a new document starts after every EOS."""
    ends = (input_ids == eos).long()
    return torch.cumsum(ends, dim=-1) - ends


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A cheap identity of the corpus (names, sizes and times of its files), read before loading it."""
    if cfg.kind == "stdlib":
        files = [(str(p), p.stat().st_size) for p in stdlib_files()]
    elif cfg.kind == "text":
        files = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in text_files(cfg.paths)]
    else:
        files = [cfg.name, cfg.subset]
    settings = json.dumps({"files": files, "cfg": _cache_settings(cfg)}, sort_keys=True)
    if cfg.tokenizer:  # a given tokenizer is part of the identity by its content, not its path
        settings += hashlib.sha256(load_tokenizer(cfg.tokenizer).to_str().encode()).hexdigest()
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _cache_root(cfg: DataConfig) -> Path:
    """Where the corpus's tokenizer and token streams are cached: one directory per corpus and tokenizer,
    whatever the row length (rows are cut from the streams when read, ``PackedRows``)."""
    return Path(cfg.cache_dir or default_cache_dir()) / "data" / f"{cfg.kind}-{corpus_fingerprint(cfg)}"


def tokenizer_to_use(cfg: DataConfig, source_tokenizer: str | Path) -> str | None:
    """The tokenizer a run starting from a model must read its data with: ``source_tokenizer``
    (the model's), or None when ``cfg`` already yields that same tokenizer from its cache,
    so the cached data is reused instead of tokenized again."""
    if cfg.tokenizer:
        return cfg.tokenizer
    done = _cache_root(cfg)
    if (done / "DONE").exists() and (done / "tokenizer.json").read_text() == Path(source_tokenizer).read_text():
        return None
    return str(source_tokenizer)


def prepare(cfg: DataConfig) -> tuple[Path, object]:
    """Tokenize the corpus into one token stream per split (or reuse what the cache holds); return (the cache
    directory, tokenizer). Every row length reads the same streams (``PackedRows``)."""
    root = _cache_root(cfg)
    if (root / "DONE").exists():
        log.info("data: reusing %s", root)
        return root, load_tokenizer(str(root / "tokenizer.json"))
    _clean(root.parent)
    log.info("data: tokenizing the %s corpus into %s", cfg.kind, root)
    _install(root, lambda tmp: _tokenize(cfg, tmp))
    return root, load_tokenizer(str(root / "tokenizer.json"))


def _clean(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for orphan in remove_orphans(directory) + remove_orphans(directory, _LEGACY_TMP):  # left by killed runs
        log.info("data: removed %s, left by an interrupted run", orphan)


def _install(root: Path, write) -> None:
    """``write(tmp)`` fills a temporary directory beside ``root``, renamed to it once done (``atomic_path``: a
    crash leaves only kvlab's own temporary); another process that finished first wins."""

    def first_wins(tmp: Path, root: Path) -> None:
        if root.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, root)

    with atomic_path(root, install=first_wins) as tmp:
        tmp.mkdir()
        write(tmp)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _train_texts(cfg: DataConfig) -> Iterator[str]:
    """The texts a tokenizer is trained on: the train split's documents, the first ``data.tokenizer_docs``
    (every one when None)."""
    n = 0
    for batch in iter_documents(cfg):
        for name, text in batch:
            if cfg.tokenizer_docs is not None and n >= cfg.tokenizer_docs:
                return
            if not _is_val(name, cfg.val_fraction):
                n += 1
                yield text
    if n == 0:  # a tiny corpus hashed to validation whole (``_tokenize`` then keeps its last document there)
        for batch in iter_documents(cfg):
            yield from (text for _, text in batch)


def _tokenize(cfg: DataConfig, tmp: Path) -> None:
    """The tokenizer (trained here unless ``data.tokenizer``) and both splits' token streams, into ``tmp``.

    One pass over the corpus (the tokenizer's training reads the train split before it, only its first
    ``data.tokenizer_docs`` documents when that is set), a batch of documents at a time:
    each document's ids and an end-of-text token are appended to its split's file, ``train.bin`` or
    ``val.bin`` (uint16, or uint32 past 65,536 tokens), so memory stays bounded whatever the corpus's size.
    """
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(_train_texts(cfg), cfg.vocab_size)
    tokenizer.save(str(tmp / "tokenizer.json"))
    eos, dtype = eos_id(tokenizer), token_dtype(tokenizer.get_vocab_size())
    docs, tokens = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    last = None  # (split, length) of the corpus's last document
    enough = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
    blank = []
    encoded = (  # (name, encoding) per document, each batch encoded at once (tokenizers' threads)
        (name, encoding)
        for batch in iter_documents(cfg, blank=blank)
        for (name, _), encoding in zip(batch, tokenizer.encode_batch([t for _, t in batch]), strict=True)
    )
    with contextlib.ExitStack() as files, tqdm(desc="tokenizing", unit=" docs", disable=None) as bar:
        streams = {split: files.enter_context(open(tmp / f"{split}.bin", "wb")) for split in docs}
        for name, encoding in encoded:
            split = "val" if _is_val(name, cfg.val_fraction) else "train"
            ids = np.append(np.asarray(encoding.ids, dtype=dtype), np.asarray(eos, dtype=dtype))
            ids.tofile(streams[split])
            docs[split] += 1
            tokens[split] += len(ids)
            last = (split, len(ids))
            bar.update()
            if tokens["train"] >= enough:  # the rest of the corpus is never read
                break
    if blank:
        log.info("data: left out %d documents with no text (%s%s)", len(blank), ", ".join(blank[:3]),
                 ", ..." if len(blank) > 3 else "")  # fmt: skip
    if last is None:
        raise ValueError(f"data: the {cfg.kind} corpus has no documents" + (" with text" if blank else ""))
    if not docs["val"] or not docs["train"]:  # tiny corpora: the last document is the validation split
        if not docs["train"]:
            os.replace(tmp / "val.bin", tmp / "train.bin")
        _move_tail(tmp / "train.bin", tmp / "val.bin", last[1], dtype)
        tokens = {"train": tokens["train"] + tokens["val"] - last[1], "val": last[1]}
        docs = {"train": docs["train"] + docs["val"] - 1, "val": 1}
    (tmp / "DONE").write_text(json.dumps({**_cache_settings(cfg), "dtype": dtype.name, "documents": docs,
                                          "tokens": tokens}))  # fmt: skip
    log.info("data: %s train and %s validation tokens from %s documents in %.1f s", f"{tokens['train']:,}",
             f"{tokens['val']:,}", f"{sum(docs.values()):,}", time.perf_counter() - started)  # fmt: skip


def _move_tail(source: Path, target: Path, n: int, dtype: np.dtype) -> None:
    """Move the last ``n`` tokens of ``source`` into ``target`` (which they replace)."""
    size = os.path.getsize(source)
    tail = np.fromfile(source, dtype=dtype, offset=size - n * dtype.itemsize)
    tail.tofile(target)
    os.truncate(source, size - n * dtype.itemsize)


def _cache_settings(cfg: DataConfig) -> dict:
    """What the cached token streams depend on: the corpus, its split and the tokenizer, not the row length."""
    keep = ("kind", "paths", "name", "subset", "text_field", "val_fraction", "max_docs", "tokenizer")
    d = {k: v for k, v in asdict(cfg).items() if k in keep}
    d["format"] = CACHE_FORMAT
    if not cfg.tokenizer:
        d["vocab_size"] = cfg.vocab_size
        if cfg.tokenizer_docs is not None:
            d["tokenizer_docs"] = cfg.tokenizer_docs
    if cfg.max_tokens is not None:
        d["max_tokens"] = cfg.max_tokens
    return d


class PackedRows(torch.utils.data.Dataset):
    """The rows of ``row_len`` tokens a split's token stream packs into: documents joined by end-of-text
    tokens, cut every ``row_len`` tokens, the tail shorter than a row left out. The stream is memory-mapped
    (any corpus size; opened again in each loader worker); ``rows[i]`` and ``rows[a:b]`` give
    ``{"input_ids": int64 array}``, a row or a [n, row_len] block."""

    def __init__(self, path: Path, dtype: str, row_len: int):
        self.path, self.dtype, self.row_len = Path(path), np.dtype(dtype), row_len
        self.n = os.path.getsize(self.path) // self.dtype.itemsize // row_len
        self._rows = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> dict:
        if self._rows is None:
            self._rows = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, self.row_len))
        return {"input_ids": np.asarray(self._rows[index], dtype=np.int64)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}


def build_datamodule(cfg: DataConfig, seed: int = 0) -> L.LightningDataModule:
    """The data module for ``cfg.kind``: packed text, or generated MQAR; ``seed`` (the run's) orders the
    training rows."""
    if cfg.kind == "mqar":
        from kvlab.recipes.mqar import MQARDataModule

        return MQARDataModule(cfg, seed)
    return LMDataModule(cfg, seed)


class LMDataModule(L.LightningDataModule):
    """Batches of packed rows: ``input_ids`` [B, seq_len], ``labels`` [B, seq_len],
    ``doc_ids`` [B, seq_len] when ``doc_mask`` is on, and ``context`` [B, context] when ``context`` is set."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        """``seed``: of the training order (the run's ``seed``, so that seeds vary the data as well as the
        initialisation); the rows themselves and the validation split do not depend on it."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        self.root: Path | None = None
        self.tokenizer = None

    def prepare_data(self) -> None:
        if self.root is None:  # Lightning calls this for every fit/validate
            self.root, self.tokenizer = prepare(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.root is None:  # other ranks: the cache is ready after prepare_data on rank 0
            self.root, self.tokenizer = prepare(self.cfg)
        self.eos = eos_id(self.tokenizer)
        done = json.loads((self.root / "DONE").read_text())
        dtype = done["dtype"]
        row_len = self.cfg.context + self.cfg.seq_len + 1
        self.splits = {s: PackedRows(self.root / f"{s}.bin", dtype, row_len) for s in ("train", "val")}
        for split, rows in self.splits.items():
            if len(rows) == 0:
                # documents go to val by a hash of their names: a few documents may send none there
                docs, tokens = done.get("documents", {}).get(split), done.get("tokens", {}).get(split)
                held = f" ({docs} documents, {tokens} tokens)" if docs is not None and tokens is not None else ""
                raise ValueError(
                    f"data: the {split} split{held} has fewer than a row's {row_len} tokens (context + seq_len + "
                    f"1); lower data.seq_len (or data.context), add documents"
                    + (f" or raise data.val_fraction={self.cfg.val_fraction}" if split == "val" else "")
                )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokens(self, split: str) -> int:
        return len(self.splits[split]) * self.cfg.seq_len

    def _collate(self, rows):
        ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
        context, ids = ids[:, : self.cfg.context], ids[:, self.cfg.context :]
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        if self.cfg.context:
            batch["context"] = context
        if self.cfg.doc_mask:
            batch["doc_ids"] = doc_ids_from_tokens(batch["input_ids"], self.eos)
        return batch

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_rows(self) -> dict:
        """Which rows the training split holds (the corpus, its split and tokenizer, the row length) and how
        many: a checkpoint's place in the data, a count of batches, means the same rows only under the same."""
        return {**_cache_settings(self.cfg), "seq_len": self.cfg.seq_len, "context": self.cfg.context,
                "rows": len(self.splits["train"])}  # fmt: skip

    def train_batches(self, world_size: int) -> int:
        """Batches in one epoch of each of ``world_size`` processes (the last partial batch is dropped)."""
        return len(self.splits["train"]) // world_size // self.cfg.batch_size

    def train_dataloader(self) -> ResumableLoader:
        world_size, rank = self._ranks()
        if self.train_batches(world_size) == 0:
            raise ValueError(
                f"data: the train split has {len(self.splits['train'])} rows of "
                f"{self.cfg.context + self.cfg.seq_len + 1} tokens, fewer than one batch "
                f"(data.batch_size={self.cfg.batch_size}"
                + (f" on each of {world_size} ranks" if world_size > 1 else "")
                + "); lower data.batch_size or data.seq_len, or add documents"
            )
        sampler = ResumableSampler(self.splits["train"], num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=self.seed)  # fmt: skip
        return ResumableLoader(
            self.train_rows(),
            self.splits["train"],
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=self._collate,
            num_workers=self.cfg.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.splits["val"],
            batch_size=self.cfg.batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.cfg.num_workers,
        )


class ResumableSampler(torch.utils.data.DistributedSampler):
    """The training order: a permutation seeded by (seed, epoch), this rank's share of it, and a
    number of leading samples to skip once (the part of the epoch a resumed run has trained on).

    A ``DistributedSampler`` also on one process, so Lightning neither replaces it nor its loader.
    Its length stays the whole epoch's: Lightning counts a resumed epoch's batches from where it stopped.
    The order is ``DistributedSampler``'s, held as one int64 array rather than its Python list (tens of
    bytes per row: gigabytes for a corpus of billions of tokens).
    """

    skip = 0
    skip_epoch = None  # the epoch ``skip`` is of (None: whichever comes)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:  # every rank gets as many: the first rows again
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        mine = order[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        return map(int, mine[skip:])


class ResumableLoader(DataLoader):
    """A training loader whose place in the epoch is part of Lightning's checkpoint.

    Lightning saves ``state_dict()`` with the loops (``_Stateful`` loaders) and
    calls ``load_state_dict`` before iterating again on resume; the epoch then
    continues with the batch after the last one trained, and the next epochs
    are the uninterrupted run's (the order depends on the epoch alone). The
    count is of batches handed to the training loop, which is what was
    trained: Lightning does not fetch ahead from loaders with a length.
    """

    def __init__(self, rows: dict, *args, **kwargs):
        """``rows``: which rows the dataset holds (``LMDataModule.train_rows``), saved with the place in them."""
        super().__init__(*args, **kwargs)
        self.rows = rows
        self.batches_done = 0

    def __iter__(self):
        if self.sampler.skip_epoch not in (None, self.sampler.epoch):
            # a checkpoint saved at its epoch's last batch: Lightning goes on with the next epoch, from its start
            self.sampler.skip = 0
        self.sampler.skip_epoch = None
        self.batches_done = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done, "batch_size": self.batch_size,
                "world_size": self.sampler.num_replicas, "seed": self.sampler.seed, "rows": self.rows}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        problem = resume_problem(state, self.batch_size, self.sampler.num_replicas, self.sampler.seed, self.rows)
        if problem is not None:
            raise ValueError(f"resume: {problem}")
        self.sampler.skip = state["batches_done"] * self.batch_size
        self.sampler.skip_epoch = state["epoch"]


def resume_problem(
    state: dict, batch_size: int, world_size: int, seed: int = 0, rows: dict | None = None, checkpoint: str = "..."
) -> str | None:
    """Why a loader state saved by :class:`ResumableLoader` cannot continue with these settings and these
    training ``rows`` (``LMDataModule.train_rows``) (None: it can). States saved before the seed ordered the data
    were seed 0's order; states saved before the rows were recorded are not checked for them. ``checkpoint``: its
    path, for the message."""
    for name, saved, now in (("data.batch_size", state.get("batch_size"), batch_size),
                             ("the number of processes", state.get("world_size", 1), world_size),
                             ("seed", state.get("seed", 0), seed)):  # fmt: skip
        if saved != now:
            return (f"the checkpoint was trained with {name}={saved}, this run has {now}; its place in the data "
                    "cannot be carried over (resume with the same settings)")  # fmt: skip
    if rows is None or "rows" not in state:
        return None
    ours, theirs = dict(rows), dict(state["rows"])
    count, saved_count = ours.pop("rows"), theirs.pop("rows", None)
    found = differences(ours, theirs, "data")
    if found:
        return (f"the checkpoint was trained on other rows ({'; '.join(found[:6])}: this run vs the checkpoint); "
                "its place in the data would be a place in these; resume with the checkpoint's data settings, "
                "or train its weights on this data from a fresh optimizer (init.from=checkpoint "
                f"init.path={checkpoint})")  # fmt: skip
    if count != saved_count:
        return (f"the training split holds {count} rows of data.seq_len={ours['seq_len']}, the checkpoint's held "
                f"{saved_count}: the corpus's files changed since; its place in the data would be a place in "
                "other rows (restore the files, or train its weights on them from a fresh optimizer: "
                f"init.from=checkpoint init.path={checkpoint})")  # fmt: skip
    return None
