import pytest
import torch

from kvlab.recipes.data import DataConfig, LMDataModule, doc_ids_from_tokens, prepare, stdlib_files


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
    from kvlab.recipes.data import load_documents

    names = []
    for where in ("a", "b/c"):
        (tmp_path / where).mkdir(parents=True)
        cfg = DataConfig(kind="text", paths=_corpus(tmp_path / where))
        names.append(load_documents(cfg)["name"])
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
