"""The importance criteria and the schedule, checked against autograd and first principles."""

import pytest
import torch

from lpt import criteria, schedule


def _setup(seed=0, out=12, inp=10, r=3, s=2.0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inp, generator=g)
    A = torch.randn(r, inp, generator=g, requires_grad=True)
    B = torch.randn(out, r, generator=g, requires_grad=True)
    x = torch.randn(7, inp, generator=g)
    t = torch.randn(7, out, generator=g)
    return W0, A, B, x, t, s


def test_lora_gradient_estimate_matches_autograd():
    """gA, gB from autograd relate to the full gradient gW by gB = s·gW·Aᵀ, gA = s·Bᵀ·gW (chain rule), so
    Eq. 10 must equal s·gW·AᵀA + s·BBᵀ·gW − s²·gW·AᵀBᵀ·gW computed from the full gradient."""
    W0, A, B, x, t, s = _setup()
    W = (W0 + s * B @ A).detach().requires_grad_(True)
    ((x @ W.T - t) ** 2).sum().backward()
    gW = W.grad
    ((x @ (W0 + s * B @ A).T - t) ** 2).sum().backward()
    G = criteria.lora_weight_grad(A.detach(), B.detach(), A.grad, B.grad)
    Ad, Bd = A.detach(), B.detach()
    expected = s * gW @ Ad.T @ Ad + s * Bd @ Bd.T @ gW - s * s * gW @ Ad.T @ Bd.T @ gW
    torch.testing.assert_close(G, expected, rtol=1e-4, atol=1e-3)
    imp = criteria.lora_importance(W0, Ad, Bd, A.grad, B.grad, s, "square")
    torch.testing.assert_close(imp, (expected * (W0 + s * Bd @ Ad)) ** 2, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(criteria.lora_importance(W0, Ad, Bd, A.grad, B.grad, s, "abs"),
                               (G * (W0 + s * Bd @ Ad)).abs(), rtol=1e-5, atol=1e-5)  # addmm vs matmul + add


@pytest.mark.parametrize("score", ["square", "abs"])
@pytest.mark.parametrize("fan_in", [False, True])
def test_chunked_group_sums_equal_full_matrix(score, fan_in):
    W0, A, B, x, t, s = _setup(out=37, inp=23)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    A, B = A.detach(), B.detach()
    full = criteria.reduce(criteria.lora_importance(W0, A, B, gA, gB, s, score), fan_in)
    got = criteria.lora_group_sums(W0, A, B, gA, gB, s, score, fan_in=fan_in, chunk_elems=50)  # 2 rows a chunk
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    # int8 codes + per-row scale give the same as the de-quantised weight
    scale = W0.abs().amax(1) / 127
    codes = torch.round(W0 / scale.unsqueeze(1)).to(torch.int8)
    deq = codes.float() * scale.unsqueeze(1)
    want = criteria.reduce(criteria.lora_importance(deq, A, B, gA, gB, s, score), fan_in)
    got8 = criteria.lora_group_sums(codes, A, B, gA, gB, s, score, fan_in=fan_in, row_scale=scale, chunk_elems=50)
    torch.testing.assert_close(got8, want, rtol=1e-5, atol=1e-6)


def test_chunk_rows_sized_for_the_device():
    # CPU: cache-sized, 2**18 float32 elements per temporary (the former fixed chunk)
    assert criteria.chunk_rows(11008, 4096, "cpu") == (1 << 18) // 4096
    assert criteria.chunk_rows(4096, 11008, torch.device("cpu")) == (1 << 18) // 11008
    # CUDA: up to 256 MiB of float32 temporaries (two per row): whole matrices at 7B, a few chunks at 70B
    assert criteria.chunk_rows(4096, 4096, "cuda") == 4096
    assert criteria.chunk_rows(11008, 4096, "cuda:1") == (256 << 20) // (8 * 4096)
    assert criteria.chunk_rows(28672, 8192, "cuda") == (256 << 20) // (8 * 8192)
    # explicit budget, and the bounds
    assert criteria.chunk_rows(100, 10, "cpu", budget_bytes=8 * 10 * 7) == 7
    assert criteria.chunk_rows(5, 10, "cuda", budget_bytes=1 << 30) == 5
    assert criteria.chunk_rows(10, 10**9, "cpu") == 1


@pytest.mark.parametrize("score", ["square", "abs"])
@pytest.mark.parametrize("fan_in", [False, True])
def test_group_sums_same_for_every_chunking(score, fan_in):
    """Device-sized chunks (here: the whole matrix), tiny chunks and an explicit whole-matrix chunk agree, with
    full-precision and with int8 weights (codes + row scale)."""
    g = torch.Generator().manual_seed(3)
    out_f, in_f, r = 300, 200, 4
    W0 = torch.randn(out_f, in_f, generator=g) * 0.05
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g) * 0.01
    gA, gB = torch.randn(r, in_f, generator=g) * 1e-3, torch.randn(out_f, r, generator=g) * 1e-3
    scale = W0.abs().amax(1) / 127
    codes = torch.round(W0 / scale.unsqueeze(1)).to(torch.int8)
    for w, rs in ((W0, None), (codes, scale)):
        whole = criteria.lora_group_sums(w, A, B, gA, gB, 2.0, score, fan_in=fan_in, row_scale=rs,
                                         chunk_elems=out_f * in_f)
        auto = criteria.lora_group_sums(w, A, B, gA, gB, 2.0, score, fan_in=fan_in, row_scale=rs)
        small = criteria.lora_group_sums(w, A, B, gA, gB, 2.0, score, fan_in=fan_in, row_scale=rs, chunk_elems=7 * in_f)
        atol = 1e-6 * float(whole.abs().max())
        assert torch.allclose(auto, whole, rtol=1e-5, atol=atol)
        assert torch.allclose(small, whole, rtol=1e-5, atol=atol)


def test_vanilla_and_magnitude():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    gW = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    assert torch.equal(criteria.vanilla_importance(W, gW), torch.tensor([[0.25, 4.0], [9.0, 1.0]]))
    assert torch.equal(criteria.magnitude_importance(W, "abs"), W.abs())
    assert torch.equal(criteria.reduce(W, fan_in=False), W.sum(1))
    assert torch.equal(criteria.reduce(W, fan_in=True), W.sum(0))
    with pytest.raises(ValueError):
        criteria.vanilla_importance(W, gW, "cube")


def test_cubic_schedule_and_prune_steps():
    start, end = schedule.ramp_bounds(100, 0.1, 0.3)
    assert (start, end) == (10, 70)
    vals = [schedule.cubic_sparsity(t, 0.5, start, end) for t in range(0, 101)]
    assert vals[10] == 0.0 and vals[70] == 0.5 and vals[100] == 0.5
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    steps = [t for t in range(1, 101) if schedule.is_prune_step(t, 10, start, end)]
    assert steps == [20, 30, 40, 50, 60, 70]
    # a short run still reaches its target at the end of the ramp
    s, e = schedule.ramp_bounds(6, 0.1, 0.3)
    assert [t for t in range(1, 7) if schedule.is_prune_step(t, 10, s, e)] == [e]


def test_moving_average():
    a = schedule.ema(None, torch.tensor([1.0, 2.0]), 0.9)
    b = schedule.ema(a, torch.tensor([3.0, 0.0]), 0.9)
    torch.testing.assert_close(b, torch.tensor([1.2, 1.8]))
    with pytest.raises(ValueError):
        schedule.ema(a, a, 1.0)
