"""Training data: corpora, a byte-level BPE tokenizer, packing, an on-disk cache.

Corpora (``DataConfig.kind``):
- ``stdlib``: the ``.py`` sources of the running interpreter's standard
  library (tests and IDLE left out): real text nobody here wrote, present on
  every machine, so the default recipes need no download;
- ``text``: local files or globs (``.txt`` one document per file; ``.jsonl``
  and ``.parquet`` one document per row, text in ``text_field``);
- ``hf``: ``datasets.load_dataset(name)`` for a hub name or a local copy;
- ``mqar``: generated multi-query associative recall examples (see
  ``kvlab.recipes.mqar``): token ids are the task, no tokenizer.

Documents are split into train/val by a hash of their name, so the split is
the same on every machine and run. The tokenizer is trained on the train
split (``tokenizers`` byte-level BPE) unless one is given by path. Documents
are joined with an EOS token and cut into rows of ``seq_len + 1`` tokens;
the boundaries stay recoverable from the EOS tokens, which is how
``doc_ids`` are made for per-document attention (``doc_mask``). With
``context: C`` rows are ``C + seq_len + 1`` tokens: the first C are the
row's context (a model with a context encoder, CEPE or XC-Cache, encodes it;
any other reads it in its prompt), and the model is scored on the
``seq_len`` that continue it.

Tokenized and packed splits are saved with ``datasets``' ``save_to_disk``
under ``cache_dir``, keyed by the corpus, the settings and the tokenizer,
so a second run with the same data starts in seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from kvlab._io import atomic_path, remove_orphans
from kvlab.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

_LEGACY_TMP = re.compile(r"^[a-z]+-[0-9a-f]{16}\.tmp(\d+)$")  # the cache's temporaries before kvlab._io
DATA_KINDS = ("stdlib", "text", "hf", "mqar")


def default_cache_dir() -> str:
    return os.environ.get("KVLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvlab"))


@dataclass
class DataConfig:
    kind: str = "stdlib"
    paths: list[str] = field(default_factory=list)  # kind=text: files or globs
    name: str | None = None  # kind=hf: dataset name or local path for load_dataset
    subset: str | None = None  # kind=hf: configuration name
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.05
    max_docs: int | None = None  # keep at most this many documents (before the split): quick runs
    tokenizer: str | None = None  # tokenizer.json or an HF tokenizer directory; None: train one
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
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"data.max_docs={self.max_docs} must be >= 1, or null for every document")
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


def load_documents(cfg: DataConfig):
    """A ``datasets.Dataset`` with columns ``name`` and ``text``, one row per document."""
    import datasets

    if cfg.kind == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files()
        names = [str(p.relative_to(root)) for p in files]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        ds = datasets.Dataset.from_dict({"name": names, "text": texts})
    elif cfg.kind == "text":
        ds = _load_local(text_files(cfg.paths), cfg.text_field)
    else:
        ds = datasets.load_dataset(cfg.name, cfg.subset, split="train")
        if cfg.text_field not in ds.column_names:
            raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.name}: {ds.column_names}")
        ds = ds.select_columns([cfg.text_field])
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
        ds = ds.add_column("name", [f"{cfg.name}/{i}" for i in range(len(ds))])
    if cfg.max_docs is not None:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    return ds


def _load_local(files: list[str], text_field: str):
    """One row per ``.txt``/``.md`` file, or per row of each ``.jsonl``/``.json``/``.parquet`` file."""
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
    names, texts = [], []
    for f in files:
        name = os.path.relpath(os.path.abspath(f), base)
        if kinds[f] == "text":
            try:
                texts.append(Path(f).read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"data.paths: {f} is not UTF-8 text (byte {e.start}: {e.reason})") from None
            names.append(name)
            continue
        try:
            rows = datasets.load_dataset(kinds[f], data_files=[f], split="train")
        except Exception as e:  # datasets wraps parse errors in its own types
            cause = e.__cause__ or e
            raise ValueError(f"data.paths: {f} could not be read as {kinds[f]}: {cause}") from None
        if text_field not in rows.column_names:
            raise ValueError(f"data.text_field={text_field!r} is not a column of {f}: {rows.column_names}")
        for i, text in enumerate(rows[text_field]):
            if not isinstance(text, str):
                raise ValueError(f"data.paths: {f}, row {i}: data.text_field={text_field!r} is {text!r}, not text")
            texts.append(text)
            names.append(f"{name}#{i}")
    return datasets.Dataset.from_dict({"name": names, "text": texts})


# -- tokenizer ------------------------------------------------------------------


# -- packing and the on-disk cache ---------------------------------------------


def doc_ids_from_tokens(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Document index of each position: a new document starts after every EOS."""
    ends = (input_ids == eos).long()
    return torch.cumsum(ends, dim=-1) - ends


def _pack(batch, *, eos: int, row_len: int):
    """datasets.map callback: join documents with EOS and cut rows of row_len tokens
    (the tail shorter than a row is dropped)."""
    stream = np.concatenate([np.append(np.asarray(ids, dtype=np.int32), eos) for ids in batch["ids"]])
    n = len(stream) // row_len
    return {"input_ids": stream[: n * row_len].reshape(n, row_len)}


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
    """Where the corpus's token ids (and its tokenizer) are cached: one directory per corpus and tokenizer,
    whatever the row length, under which each row length's packed rows have their own (``_rows_root``)."""
    return Path(cfg.cache_dir or default_cache_dir()) / "data" / f"{cfg.kind}-{corpus_fingerprint(cfg)}"


def _rows_root(cfg: DataConfig) -> Path:
    """Where the rows of ``context + seq_len + 1`` tokens packed from the cached token ids are."""
    return _cache_root(cfg) / f"rows-{cfg.context + cfg.seq_len + 1}"


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
    """Tokenize both splits and pack them into rows (or reuse what the cache holds); return (the rows' directory,
    tokenizer). The token ids are cached apart from the rows, so another ``seq_len`` packs again from them
    without tokenizing."""
    tokens, rows = _cache_root(cfg), _rows_root(cfg)
    if (rows / "DONE").exists():
        log.info("data: reusing %s", rows)
        return rows, load_tokenizer(str(tokens / "tokenizer.json"))
    if (tokens / "DONE").exists():
        log.info("data: reusing the token ids of %s", tokens)
        tokenizer = load_tokenizer(str(tokens / "tokenizer.json"))
    else:
        tokenizer = _tokenize(cfg, tokens)
    _clean(rows.parent)
    _install(rows, lambda tmp: _pack_splits(tmp, tokens, eos_id(tokenizer), cfg))
    return rows, tokenizer


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


def _tokenize(cfg: DataConfig, root: Path):
    """The corpus split, its tokenizer (trained here unless ``data.tokenizer``) and both splits' token ids, into
    ``root``; returns the tokenizer."""
    fingerprint = corpus_fingerprint(cfg)
    docs = load_documents(cfg)
    if len(docs) == 0:
        raise ValueError(f"data: the {cfg.kind} corpus has no documents")
    is_val = [_is_val(n, cfg.val_fraction) for n in docs["name"]]
    splits = {
        "train": docs.select([i for i, v in enumerate(is_val) if not v]),
        "val": docs.select([i for i, v in enumerate(is_val) if v]),
    }
    if len(splits["val"]) == 0 or len(splits["train"]) == 0:  # tiny corpora: hold out the last document
        splits = {"train": docs.select(range(len(docs) - 1)), "val": docs.select([len(docs) - 1])}
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(splits["train"]["text"], cfg.vocab_size)
    _clean(root.parent)

    def write(tmp: Path) -> None:
        tokenizer.save(str(tmp / "tokenizer.json"))
        for split, ds in splits.items():
            ds.map(
                lambda b: {"ids": [e.ids for e in tokenizer.encode_batch(b["text"])]},
                batched=True,
                remove_columns=ds.column_names,
                new_fingerprint=f"{fingerprint}-{split}-ids",
                desc=f"tokenizing {split}",
            ).save_to_disk(str(tmp / "ids" / split))
        (tmp / "DONE").write_text(json.dumps(_cache_settings(cfg)))

    _install(root, write)
    return load_tokenizer(str(root / "tokenizer.json"))


def _pack_splits(tmp: Path, tokens: Path, eos: int, cfg: DataConfig) -> None:
    """Pack each split's cached token ids (``tokens/ids``) into rows of ``context + seq_len + 1`` tokens, into
    ``tmp`` with a DONE marker."""
    import datasets

    for split in ("train", "val"):
        ids = datasets.load_from_disk(str(tokens / "ids" / split))
        packed = ids.map(
            _pack,
            batched=True,
            batch_size=len(ids),  # one pass, so no tokens are lost between batches
            keep_in_memory=True,  # (a cache file would land among the token ids, one per row length)
            remove_columns=["ids"],
            fn_kwargs={"eos": eos, "row_len": cfg.context + cfg.seq_len + 1},
            new_fingerprint=f"{corpus_fingerprint(cfg)}-{split}-rows-{cfg.context + cfg.seq_len + 1}",
            desc=f"packing {split}",
        )
        if len(packed) == 0:
            raise ValueError(
                f"data: the {split} split has fewer than a row's {cfg.context + cfg.seq_len + 1} tokens "
                f"(context + seq_len + 1); lower data.seq_len (or data.context) or add documents"
            )
        packed.save_to_disk(str(tmp / split))
    (tmp / "DONE").write_text(json.dumps({"row_len": cfg.context + cfg.seq_len + 1}))


def _cache_settings(cfg: DataConfig) -> dict:
    """What the cached token ids depend on: the corpus, its split and the tokenizer, not the row length."""
    keep = ("kind", "paths", "name", "subset", "text_field", "val_fraction", "max_docs", "tokenizer")
    d = {k: v for k, v in asdict(cfg).items() if k in keep}
    if not cfg.tokenizer:
        d["vocab_size"] = cfg.vocab_size
    return d


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
        import datasets

        if self.root is None:  # other ranks: the cache is ready after prepare_data on rank 0
            self.root, self.tokenizer = prepare(self.cfg)
        self.eos = eos_id(self.tokenizer)
        self.splits = {s: datasets.load_from_disk(str(self.root / s)).with_format("numpy") for s in ("train", "val")}

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
    """

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A training loader whose place in the epoch is part of Lightning's checkpoint.

    Lightning saves ``state_dict()`` with the loops (``_Stateful`` loaders) and
    calls ``load_state_dict`` before iterating again on resume; the epoch then
    continues with the batch after the last one trained, and the next epochs
    are the uninterrupted run's (the order depends on the epoch alone). The
    count is of batches handed to the training loop, which is what was
    trained: Lightning does not fetch ahead from loaders with a length.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = 0

    def __iter__(self):
        self.batches_done = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done, "batch_size": self.batch_size,
                "world_size": self.sampler.num_replicas, "seed": self.sampler.seed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        problem = resume_problem(state, self.batch_size, self.sampler.num_replicas, self.sampler.seed)
        if problem is not None:
            raise ValueError(f"resume: {problem}")
        self.sampler.skip = state["batches_done"] * self.batch_size


def resume_problem(state: dict, batch_size: int, world_size: int, seed: int = 0) -> str | None:
    """Why a loader state saved by :class:`ResumableLoader` cannot continue with these settings (None: it can).
    States saved before the seed ordered the data were seed 0's order."""
    for name, saved, now in (("data.batch_size", state.get("batch_size"), batch_size),
                             ("the number of processes", state.get("world_size", 1), world_size),
                             ("seed", state.get("seed", 0), seed)):  # fmt: skip
        if saved != now:
            return (f"the checkpoint was trained with {name}={saved}, this run has {now}; its place in the data "
                    "cannot be carried over (resume with the same settings)")  # fmt: skip
    return None
