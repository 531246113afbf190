import torch

from kvlab.layers.kv_cache import RingKV, StateSlot, StaticKV


def _tokens(start, t):
    """K/V whose every element is its absolute position, so we can read where it went."""
    pos = torch.arange(start, start + t, dtype=torch.float32)
    kv = pos.view(1, 1, t, 1).expand(2, 1, t, 3).clone()
    return kv, kv + 0.5


def test_ring_holds_exactly_the_last_window_positions():
    ring = RingKV(2, 1, 4, 3, 3, dtype=torch.float32, device="cpu")
    seen = 0
    for t in [3, 1, 1, 6, 1, 2, 1]:
        k, v = _tokens(seen, t)
        view = ring.update(k, v, seen)
        # The view covers the held positions and all new ones, each labelled with its position.
        positions = view.k[0, 0, :, 0]
        if view.k_pos is not None:
            assert torch.equal(positions, view.k_pos.float())
        # Decoding sees the window ending at the new token; several tokens see
        # the held window before them too, and the mask picks each query's keys.
        first = seen + 1 - 4 if t == 1 else seen - 4
        expected = set(range(max(0, first), seen + t))
        assert set(positions.tolist()) == expected
        if t > 1:  # the held positions then the new, in order: the step's queries are the last t of them
            assert view.k_pos is None and positions.tolist() == sorted(expected)
        assert torch.equal(view.v, view.k + 0.5)
        seen += t
        held = set(ring.k[0, 0, : min(seen, 4), 0].tolist())
        assert held == set(range(max(0, seen - 4), seen))
        assert ring.nbytes(seen) == min(seen, 4) * 2 * 2 * 3 * 4  # positions x (K and V) x batch x dim x fp32


def test_static_cache_refuses_overflow():
    slot = StaticKV(1, 1, 4, 2, 2, dtype=torch.float32, device="cpu")
    slot.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    try:
        slot.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 3)
    except ValueError as e:
        assert "max_len=4" in str(e)
    else:
        raise AssertionError("overflow was not refused")


def test_a_step_written_twice_leaves_the_cache_as_written_once():
    """Slots store at the positions they are given (the parallel passes rewrite a step): no counter moves."""
    once, twice = (StaticKV(2, 1, 8, 3, 3, dtype=torch.float32, device="cpu") for _ in range(2))
    k, v = _tokens(0, 5)
    once.update(k, v, 0)
    twice.update(k * 7, v * 7, 0)  # a first pass, overwritten by the last
    twice.update(k, v, 0)
    assert torch.equal(once.view(5).k, twice.view(5).k) and once.nbytes(5) == twice.nbytes(5)


def test_a_key_contiguous_state_holds_its_shape_keys_first_on_a_cpu_only():
    """``key_contiguous`` states keep their declared [..., N, P] shape over [..., P, N] memory on a CPU (what a
    compiled step reads in one pass); other devices, and the other states, are plain contiguous tensors."""
    slot = StateSlot(2, {"s": (3, 4, 5), "prev": (7,)}, dtype=torch.float32, device="cpu", key_contiguous=("s",))
    assert slot.s.shape == (2, 3, 4, 5) and slot.s.stride()[-2:] == (1, 4) and not slot.s.any()
    assert slot.prev.is_contiguous() and slot.nbytes() == (2 * 3 * 4 * 5 + 2 * 7) * 4
    rows = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    slot.s.copy_(rows)
    slot.reorder(torch.tensor([1, 1]))
    assert torch.equal(slot.s, rows[[1, 1]]) and slot.s.stride()[-2:] == (1, 4)
    elsewhere = StateSlot(2, {"s": (3, 4, 5)}, dtype=torch.float32, device="meta", key_contiguous=("s",))
    assert elsewhere.s.shape == (2, 3, 4, 5) and elsewhere.s.is_contiguous()
