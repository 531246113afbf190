"""Packed documents (doc_ids) give the outputs of the documents run separately."""

import pytest
import torch

from kvlab import build_model
from kvlab.kernels.attention import positions_in_documents
from tests.archs.test_decode import VARIANTS


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert positions_in_documents(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_documents_match_separate_runs(name):
    model = build_model(VARIANTS[name]).eval()
    if not model.takes_packed_documents:  # meta tokens (hymba): refused, tests/layers/test_parallel.py
        pytest.skip("the model goes before a row's first token, not before each document: it refuses doc_ids")
    lengths = [5, 9, 1, 7]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids)
        want = torch.cat([model(d) for d in docs], dim=1)
        unmasked = model(packed)
    assert (got - want).abs().max() <= 1e-5
    assert (unmasked - want).abs().max() > 1e-3  # without doc_ids the documents do see each other


def test_cu_seqlens_are_doc_ids_in_flash_attns_form():
    from kvlab.kernels.attention import doc_ids_from_cu_seqlens

    # two rows of 6: documents of 3, 3 | 2, 4 over the flattened 12 tokens
    doc_ids = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 6, 8, 12]), (2, 6))
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]]
    model = build_model(VARIANTS["mamba2"]).eval()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, cu_seqlens=torch.tensor([0, 3, 6, 8, 12])), model(ids, doc_ids=doc_ids))
    for bad, message in [
        (torch.tensor([0, 3, 12]), "every row boundary"),  # a document running from row 0 into row 1
        (torch.tensor([0, 3, 3, 12]), "must rise strictly from 0 to the batch's 2 x 6 = 12 tokens"),
        (torch.tensor([0, 6, 10]), "must rise strictly"),
        (torch.tensor([[0, 6, 12]]), "expected a 1-D integer tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(ids, cu_seqlens=bad)
    with pytest.raises(ValueError, match="give doc_ids or cu_seqlens"):
        model(ids, doc_ids=doc_ids, cu_seqlens=torch.tensor([0, 6, 12]))
