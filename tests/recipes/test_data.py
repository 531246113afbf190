import pytest
import torch

from kvlab.recipes.data import DataConfig, LMDataModule, doc_ids_from_tokens, prepare, resume_problem, stdlib_files


def _documents(cfg):
    """The corpus's (names, texts) as ``iter_documents`` reads them."""
    from kvlab.recipes.data import iter_documents

    pairs = [pair for batch in iter_documents(cfg, batch_size=2) for pair in batch]
    return {"name": [n for n, _ in pairs], "text": [t for _, t in pairs]}


def _corpus(tmp_path, n=6):
    for i in range(n):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}: " + "def f(x):\n    return x + 1\n" * (5 + i))
    return [str(tmp_path / "*.txt")]


def test_doc_ids_restart_after_each_eos():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8]])
    assert doc_ids_from_tokens(ids, eos=0).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


def test_text_files_pack_into_rows_with_boundaries(tmp_path):
    cfg = DataConfig(kind="text", paths=_corpus(tmp_path), seq_len=16, batch_size=4, vocab_size=300,
                     val_fraction=0.3, doc_mask=True, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (4, 16)
    row = dm.splits["train"][0]["input_ids"]
    assert row.shape == (17,)
    eos = dm.eos
    # Every document ends with EOS: the packed stream holds one EOS per train document (minus the cut tail).
    stream = torch.cat([torch.from_numpy(r["input_ids"]) for r in dm.splits["train"]])
    assert 1 <= int((stream == eos).sum()) <= 6
    assert dm.tokenizer.decode(row.tolist()).strip() != ""
    first, again = prepare(cfg), prepare(cfg)
    assert first[0] == again[0] == dm.root  # cached: same directory, reused


def test_documents_without_text_are_left_out(tmp_path, caplog):
    """An empty file or row (a third of wikitext's rows) would be a lone end-of-text token in the stream."""
    import json

    import numpy as np

    _corpus(tmp_path, n=2)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\t\n")
    rows = [{"text": "first row"}, {"text": ""}, {"text": "\n"}, {"text": "last row"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = [str(tmp_path / p) for p in ("*.txt", "*.md", "*.jsonl")]
    cfg = DataConfig(kind="text", paths=paths, vocab_size=300, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    assert _documents(cfg)["name"] == ["doc0.txt", "doc1.txt", "rows.jsonl#0", "rows.jsonl#3"]
    with caplog.at_level("INFO", logger="kvlab.recipes.data"):
        root, tokenizer = prepare(cfg)
    assert "left out 4 documents with no text (blank.md, empty.txt, rows.jsonl#1, ...)" in caplog.text
    done = json.loads((root / "DONE").read_text())
    assert done["documents"] == {"train": 3, "val": 1}  # the last document kept for validation
    eos = tokenizer.token_to_id("<|endoftext|>")
    stream = np.concatenate([np.fromfile(root / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert int((stream == eos).sum()) == 4 and not ((stream[1:] == eos) & (stream[:-1] == eos)).any()
    (tmp_path / "doc0.txt").write_text(" ")
    (tmp_path / "doc1.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="the text corpus has no documents with text"):
        prepare(cfg)


def test_another_seq_len_reads_the_cached_tokens_without_tokenizing(tmp_path, monkeypatch):
    from kvlab.recipes import data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cfg = DataConfig(kind="text", paths=_corpus(corpus), seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "a"))
    _setup(LMDataModule(cfg))
    monkeypatch.setattr(data, "iter_documents", lambda *a, **k: pytest.fail("the corpus was read again"))
    cached = _setup(LMDataModule(DataConfig(**{**cfg.__dict__, "seq_len": 8})))
    monkeypatch.undo()  # from nothing at seq_len 8: the same rows
    fresh = _setup(LMDataModule(DataConfig(**{**cfg.__dict__, "seq_len": 8, "cache_dir": str(tmp_path / "b")})))
    assert cached.tokenizer.to_str() == fresh.tokenizer.to_str()
    for split in ("train", "val"):
        rows = cached.splits[split][:]["input_ids"]
        assert rows.shape[1] == 9 and (rows == fresh.splits[split][:]["input_ids"]).all()


def test_missing_files_and_bad_settings_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prepare(DataConfig(kind="text", paths=[str(tmp_path / "none*.txt")], cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.kind='web'"):
        LMDataModule(DataConfig(kind="web"))
    with pytest.raises(ValueError, match="data.paths is empty"):
        LMDataModule(DataConfig(kind="text"))


def test_stdlib_corpus_leaves_out_tests():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("test" in p.parts or "site-packages" in p.parts for p in files)


def test_split_of_local_files_does_not_depend_on_where_they_are(tmp_path):

    names = []
    for where in ("a", "b/c"):
        (tmp_path / where).mkdir(parents=True)
        cfg = DataConfig(kind="text", paths=_corpus(tmp_path / where))
        names.append(_documents(cfg)["name"])
    assert names[0] == names[1] == [f"doc{i}.txt" for i in range(6)]


def test_a_source_tokenizer_reuses_the_cache_only_when_it_is_the_same(tmp_path):
    from kvlab.recipes.data import tokenizer_to_use, train_tokenizer

    cfg = DataConfig(
        kind="text", paths=_corpus(tmp_path), seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "cache")
    )
    root, tokenizer = prepare(cfg)
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    tokenizer.save(str(same))
    train_tokenizer(["something else entirely"] * 5, 280).save(str(other))
    assert tokenizer_to_use(cfg, same) is None  # the cached data already uses it
    assert tokenizer_to_use(cfg, other) == str(other)
    fresh = DataConfig(kind="text", paths=cfg.paths, seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "empty"))
    assert tokenizer_to_use(fresh, same) == str(same)  # nothing cached: be explicit


def _write_rows(path, rows):
    import json

    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "hf"])
def test_every_data_kind_loads_with_its_default_settings(tmp_path, kind):
    """The default text_field is `text`: a corpus with that column must load (it used to fail renaming it)."""

    texts = [f"document {i}: " + "print(1)\n" * (i + 1) for i in range(4)]
    if kind == "txt":
        for i, t in enumerate(texts):
            (tmp_path / f"d{i}.txt").write_text(t)
        cfg = DataConfig(kind="text", paths=[str(tmp_path / "*.txt")])
    elif kind == "hf":  # a local dataset directory, as load_dataset reads one
        _write_rows(tmp_path / "train.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
        cfg = DataConfig(kind="hf", name=str(tmp_path))
    else:
        _write_rows(tmp_path / f"corpus.{kind}", [{"text": t, "id": i} for i, t in enumerate(texts)])
        cfg = DataConfig(kind="text", paths=[str(tmp_path / f"corpus.{kind}")])
    docs = _documents(cfg)
    assert sorted(docs["text"]) == sorted(texts)
    assert len(set(docs["name"])) == 4


def test_rows_of_several_files_keep_their_own_names(tmp_path):

    _write_rows(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    _write_rows(tmp_path / "b.jsonl", [{"text": "three"}])
    docs = _documents(DataConfig(kind="text", paths=[str(tmp_path / "*.jsonl")]))
    assert docs["name"] == ["a.jsonl#0", "a.jsonl#1", "b.jsonl#0"]


def test_unreadable_text_names_the_file_and_row(tmp_path):

    (tmp_path / "bad.txt").write_bytes(b"fine so far \xff\xfe then not")
    with pytest.raises(ValueError, match=r"bad.txt is not UTF-8 text \(byte 12"):
        _documents(DataConfig(kind="text", paths=[str(tmp_path / "bad.txt")]))
    _write_rows(tmp_path / "rows.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    with pytest.raises(ValueError, match=r"rows.jsonl, row 1: data.text_field='text' is None, not text"):
        _documents(DataConfig(kind="text", paths=[str(tmp_path / "rows.jsonl")]))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl could not be read as json"):
        _documents(DataConfig(kind="text", paths=[str(tmp_path / "broken.jsonl")]))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_docs", 0, "data.max_docs=0 must be >= 1"),
        ("num_workers", -1, "data.num_workers=-1 must be >= 0"),
        ("text_field", "", "data.text_field is empty"),
    ],  # fmt: skip
)
def test_bad_data_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value}).validate()


def test_a_corpus_smaller_than_a_batch_is_an_error_not_zero_steps(tmp_path):
    cfg = DataConfig(kind="text", paths=_corpus(tmp_path, n=2), seq_len=16, batch_size=64, vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup()
    assert dm.train_batches(world_size=1) == 0
    with pytest.raises(ValueError, match="fewer than one batch .data.batch_size=64"):
        dm.train_dataloader()


def test_the_training_order_resumes_mid_epoch_and_stays_the_same_after(tmp_path):
    cfg = DataConfig(kind="text", paths=_corpus(tmp_path), seq_len=8, batch_size=2, vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup()

    def epoch(loader, epoch_number):
        loader.sampler.set_epoch(epoch_number)
        return [b["input_ids"] for b in loader]

    whole = dm.train_dataloader()
    first, second = epoch(whole, 0), epoch(whole, 1)
    # reshuffled per epoch
    assert len(first) >= 4 and not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    interrupted = dm.train_dataloader()
    interrupted.sampler.set_epoch(0)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    rows = state.pop("rows")
    assert state == {"epoch": 0, "batches_done": 3, "batch_size": 2, "world_size": 1, "seed": 0}
    assert rows == {**{k: getattr(cfg, k) for k in ("kind", "paths", "seq_len", "context", "val_fraction")},
                    **rows, "rows": len(dm.splits["train"])}  # fmt: skip
    state["rows"] = rows
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = epoch(resumed, 0)
    assert len(rest) == len(first) - 3 and all(torch.equal(a, b) for a, b in zip(rest, first[3:], strict=True))
    assert resumed.state_dict()["batches_done"] == len(first)
    # the next epoch as if it had never stopped
    assert all(torch.equal(a, b) for a, b in zip(epoch(resumed, 1), second, strict=True))
    other = DataConfig(**{**cfg.__dict__, "batch_size": 3})
    with pytest.raises(ValueError, match="data.batch_size=2, this run has 3"):
        _setup(LMDataModule(other)).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0, this run has 1"):
        _setup(LMDataModule(cfg, seed=1)).train_dataloader().load_state_dict(state)
    assert resume_problem({k: v for k, v in state.items() if k != "seed"}, 2, 1, 0) is None  # saved before seeds
    # Other rows: the place would be a place in them. Another row length, or the corpus's files changed.
    longer = DataConfig(**{**cfg.__dict__, "seq_len": 9})
    with pytest.raises(ValueError, match=r"trained on other rows \(data.seq_len: 9 vs 8: this run vs the checkpoint"):
        _setup(LMDataModule(longer)).train_dataloader().load_state_dict(state)
    (tmp_path / "more.txt").write_text("another document, " * 40)
    grown = LMDataModule(cfg)
    with pytest.raises(ValueError, match=rf"holds {len(_setup(grown).splits['train'])} rows of data.seq_len=8, the "
                                         rf"checkpoint's held {rows['rows']}: the corpus's files changed"):  # fmt: skip
        grown.train_dataloader().load_state_dict(state)
    assert resume_problem({k: v for k, v in state.items() if k != "rows"}, 2, 1, 0, grown.train_rows()) is None


def test_the_seed_orders_the_training_rows_and_nothing_else(tmp_path):
    """Multi-seed ablations vary the data order as well as the initialisation; validation stays the same."""
    cfg = DataConfig(kind="text", paths=_corpus(tmp_path), seq_len=8, batch_size=2, vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    runs = []
    for seed in (0, 0, 1):
        dm = _setup(LMDataModule(cfg, seed=seed))
        loader = dm.train_dataloader()
        val = [b["input_ids"] for b in dm.val_dataloader()]
        runs.append((list(loader.sampler), [b["input_ids"] for b in loader], val))
    (order, a, a_val), (_, again, _), (other, b, b_val) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))  # a seed is one order
    assert not torch.equal(a[0], b[0])  # another seed starts elsewhere
    assert order != other and sorted(order) == sorted(other)  # of the same rows
    assert all(torch.equal(x, y) for x, y in zip(a_val, b_val, strict=True))


def _setup(dm):
    dm.prepare_data()
    dm.setup()
    return dm


def test_an_interrupted_preparation_is_cleaned_up_and_redone(tmp_path):
    import subprocess
    import sys

    cfg = DataConfig(kind="text", paths=_corpus(tmp_path), seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "c"))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    data_dir = tmp_path / "c" / "data"
    data_dir.mkdir(parents=True)
    leftovers = [data_dir / f".text-0123456789abcdef.kvlab-tmp-{dead}", data_dir / f"text-0123456789abcdef.tmp{dead}"]
    for d in leftovers:  # today's temporary name, and the one kvlab used before
        d.mkdir()
        (d / "tokenizer.json").write_text("half")
    mine = data_dir / "my-notes.tmp1"
    mine.mkdir()
    root, _ = prepare(cfg)
    assert (root / "DONE").exists() and not any(d.exists() for d in leftovers) and mine.exists()


def test_rows_with_a_context_split_into_context_and_continuation():
    """data.context: rows of context + seq_len + 1 tokens; the first ``context`` are the row's context."""
    import numpy as np

    dm = LMDataModule(DataConfig(seq_len=6, context=4))
    batch = dm._collate([{"input_ids": np.arange(11)}, {"input_ids": np.arange(11) + 20}])
    assert batch["context"].tolist() == [[0, 1, 2, 3], [20, 21, 22, 23]]
    assert batch["input_ids"][0].tolist() == [4, 5, 6, 7, 8, 9] and batch["labels"][0].tolist() == [5, 6, 7, 8, 9, 10]
    for bad, message in [({"context": -1}, "data.context=-1 must be a number of tokens >= 0"),
                         ({"context": 8, "doc_mask": True}, "data.doc_mask=true packs documents per row"),
                         ({"context": 8, "kind": "mqar"}, "data.kind=mqar rows are tasks")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DataConfig(**bad).validate()


def test_the_training_order_is_distributed_samplers_held_as_an_array():
    """ResumableSampler keeps DistributedSampler's order (checkpoints of earlier runs resume on the same rows)."""
    from kvlab.recipes.data import ResumableSampler

    for n, world, drop_last, shuffle in [(10, 1, False, True), (10, 3, False, True), (11, 4, True, True),
                                         (7, 3, False, False), (2, 5, False, True)]:  # fmt: skip
        for rank in range(world):
            ours, theirs = (cls(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last)
                            for cls in (ResumableSampler, torch.utils.data.DistributedSampler))  # fmt: skip
            ours.set_epoch(2)
            theirs.set_epoch(2)
            assert list(ours) == list(theirs)


def test_a_streamed_dataset_gives_the_rows_of_the_downloaded_one_and_max_tokens_stops_it(tmp_path):
    import json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"document {i}: " + "x = f(y)\n" * (3 + i % 7) for i in range(40)]
    _write_rows(corpus / "train.jsonl", [{"text": t} for t in texts])
    modules = {}
    for streaming in (False, True):
        cfg = DataConfig(kind="hf", name=str(corpus), streaming=streaming, seq_len=8, vocab_size=300,
                         val_fraction=0.2, cache_dir=str(tmp_path / f"cache-{streaming}"))  # fmt: skip
        modules[streaming] = _setup(LMDataModule(cfg))
    for split in ("train", "val"):
        assert (modules[True].splits[split][:]["input_ids"] == modules[False].splits[split][:]["input_ids"]).all()
    whole = json.loads((modules[True].root / "DONE").read_text())["tokens"]["train"]
    capped = _setup(LMDataModule(DataConfig(**{**cfg.__dict__, "max_tokens": whole // 3})))
    assert capped.root != modules[True].root
    done = json.loads((capped.root / "DONE").read_text())
    longest = max(len(capped.tokenizer.encode(t).ids) for t in texts) + 1
    # reading stops at the first document that reaches the cap; if none of those read went to validation (the
    # split hashes the names, which hold tmp_path), the last one read is the validation split
    assert (
        whole // 3 <= done["tokens"]["train"] + done["tokens"]["val"] and done["tokens"]["train"] < whole // 3 + longest
    )
    assert len(capped.splits["train"]) == done["tokens"]["train"] // 9
    with pytest.raises(ValueError, match="data.streaming=true is for data.kind=hf, not 'text'"):
        DataConfig(kind="text", paths=["x"], streaming=True).validate()


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_a_corpus_hashed_to_one_split_keeps_its_last_document_for_validation(tmp_path, fraction):
    import numpy as np

    texts = [f"doc {i} " * (i + 2) for i in range(3)]
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)
    cfg = DataConfig(kind="text", paths=[str(tmp_path / "*.txt")], seq_len=2, vocab_size=270, val_fraction=fraction,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    root, tokenizer = prepare(cfg)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = [tokenizer.encode(t).ids + [eos] for t in texts]
    assert np.fromfile(root / "train.bin", dtype=np.uint16).tolist() == ids[0] + ids[1]
    assert np.fromfile(root / "val.bin", dtype=np.uint16).tolist() == ids[2]


def test_tokenizing_holds_a_batch_of_documents_not_the_corpus(tmp_path, monkeypatch):
    """Peak Python memory while tokenizing stays flat when the corpus grows 4x (it held every text and id
    before: a corpus larger than memory could not be prepared)."""
    import tracemalloc

    from kvlab.recipes import data
    from kvlab.recipes.data import train_tokenizer

    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 300).save(str(tokenizer))
    peaks = []
    for n in (2000, 8000):

        def corpus(cfg, batch_size, n=n):
            for start in range(0, n, batch_size):
                yield [
                    (f"d{i}", f"doc {i}: " + "y = g(x) + 1\n" * 30) for i in range(start, min(n, start + batch_size))
                ]

        monkeypatch.setattr(data, "_document_batches", corpus)
        cfg = DataConfig(kind="hf", name=f"corpus-{n}", tokenizer=str(tokenizer), cache_dir=str(tmp_path / f"c{n}"))
        tracemalloc.start()
        prepare(cfg)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_a_missing_tokenizer_json_names_a_slow_tokenizers_files_and_how_to_convert_them(tmp_path):
    from kvlab.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"data.tokenizer: no tokenizer.json at .*tokenizer.json$"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds a slow tokenizer's tokenizer.model: .*save_pretrained"):
        load_tokenizer(str(tmp_path))
