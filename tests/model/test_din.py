"""The DIN module: shapes, masking, and agreement of forward / forward_fast / serve."""

from __future__ import annotations

import itertools

import pytest
import torch

from contracts.vocab import OOV, PAD
from model.din import DIN, DINConfig, build_model

N_ITEMS, N_CATES = 50, 8


def make_model(seed: int = 0, **cfg_kwargs):
    g = torch.Generator().manual_seed(123)
    item_cate = torch.randint(2, N_CATES, (N_ITEMS,), generator=g)
    item_cate[PAD], item_cate[OOV] = PAD, OOV
    cfg = DINConfig(
        n_items=N_ITEMS, n_categories=N_CATES, item_dim=8, cate_dim=8, max_history=12, **cfg_kwargs
    )
    model = build_model(cfg, item_cate, seed=seed)
    # Give batch norm non-trivial running statistics, then freeze them: eval mode is what is compared.
    model.train()
    with torch.no_grad():
        target, hist, hist_len = make_batch(64, 12, seed=99)
        model.forward_fast(target, hist, hist_len)
    return model.eval()


def make_batch(B: int, T: int, seed: int = 0, min_len: int = 0):
    """Random targets and histories; positions >= hist_len hold padding (0)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(2, N_ITEMS, (B,), generator=g)  # (B,)
    hist_len = torch.randint(min_len, T + 1, (B,), generator=g)  # (B,)
    hist = torch.randint(2, N_ITEMS, (B, T), generator=g)  # (B, T)
    hist[torch.arange(T).unsqueeze(0) >= hist_len.unsqueeze(1)] = PAD
    return target, hist, hist_len


VARIANTS = [
    dict(pooling=p, att_softmax=s, head_activation=a, head_input=h)
    for p, s, a, h in itertools.product(
        ["attention", "sum"], [False, True], ["dice", "prelu"], ["u,q,u*q", "u,q"]
    )
    if not (p == "sum" and s)  # softmax only affects attention pooling
]


def _ids(v: dict) -> str:
    return "-".join(str(x) for x in v.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_shapes(variant):
    model = make_model(**variant)
    target, hist, hist_len = make_batch(7, 5)
    assert model(target, hist, hist_len).shape == (7,)
    assert model.forward_fast(target, hist, hist_len).shape == (7,)
    assert model.embed(hist).shape == (7, 5, 16)
    ctr = model.serve(target, torch.arange(7), hist, hist_len)
    assert ctr.shape == (7,) and bool(((ctr > 0) & (ctr < 1)).all())


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_padding_never_changes_a_score(variant):
    model = make_model(**variant)
    target, hist, hist_len = make_batch(16, 6)
    with torch.no_grad():
        ref = model(target, hist, hist_len)
        # other ids at padded positions
        noisy = hist.clone()
        pad = torch.arange(6).unsqueeze(0) >= hist_len.unsqueeze(1)
        noisy[pad] = torch.randint(2, N_ITEMS, (int(pad.sum()),))
        # a longer T, all padding
        longer = torch.cat([hist, torch.zeros(16, 9, dtype=torch.int64)], dim=1)
        for form in (model.forward, model.forward_fast):
            torch.testing.assert_close(form(target, noisy, hist_len), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(form(target, longer, hist_len), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_forward_fast_and_serve_match_forward(variant):
    model = make_model(**variant)
    target, hist, hist_len = make_batch(32, 10)
    hist_len[:3] = 0  # empty histories
    hist[:3] = PAD
    with torch.no_grad():
        ref = model(target, hist, hist_len)
        torch.testing.assert_close(model.forward_fast(target, hist, hist_len), ref, rtol=0, atol=1e-6)
        # serve: 4 users, each with 8 candidates, given as one row per user
        users = torch.arange(4).repeat_interleave(8)  # (32,)
        hist_u, len_u = hist[::8], hist_len[::8]  # (4, T), (4,)
        ref_u = torch.sigmoid(model(target, hist_u[users], len_u[users]))
        torch.testing.assert_close(model.serve(target, users, hist_u, len_u), ref_u, rtol=0, atol=1e-6)
        # serve with the rows in the same order as forward's
        ctr = model.serve(target, torch.arange(32), hist, hist_len)
        torch.testing.assert_close(ctr, torch.sigmoid(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_attention_is_what_the_pooling_weighs(variant):
    """The weights `attention` returns, pooled by hand and put through the head, give forward's logits;
    they are zero past each history's end; the serving graph's second output equals them."""
    model = make_model(**variant)
    target, hist, hist_len = make_batch(24, 10, seed=5)
    hist_len[:2] = 0
    hist[:2] = PAD
    with torch.no_grad():
        w = model.attention(target, hist, hist_len)  # (B, T)
        assert w.shape == (24, 10)
        past_end = torch.arange(10).unsqueeze(0) >= hist_len.unsqueeze(1)
        assert bool((w[past_end] == 0).all()) and bool((w[~past_end] != 0).all())
        if variant["att_softmax"]:
            sums = w.sum(1)
            torch.testing.assert_close(sums[hist_len > 0], torch.ones(int((hist_len > 0).sum())))
        u = torch.einsum("bt,bte->be", w, model.embed(hist))
        torch.testing.assert_close(model._head(u, model.embed(target)), model(target, hist, hist_len))
        users = torch.arange(4).repeat_interleave(6).flip(0)  # grouped users, in reverse order
        hist_u, len_u = hist[::6], hist_len[::6]
        ctr, att = model.serve_explained(target, users, hist_u, len_u)
        want = model.attention(target, hist_u[users], len_u[users])
        torch.testing.assert_close(att, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(ctr, model.serve(target, users, hist_u, len_u), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_serve_users_in_any_order(variant):
    """serve == forward for several users with different history lengths (one empty), unknown items,
    junk ids past hist_len, a user without candidates, and candidates interleaved across users."""
    model = make_model(**variant)
    g = torch.Generator().manual_seed(5)
    U, T = 5, 9
    hist_len = torch.tensor([9, 0, 3, 9, 6])
    hist = torch.randint(2, N_ITEMS, (U, T), generator=g)  # junk past hist_len, on purpose
    hist[2, 1] = OOV
    target_user = torch.repeat_interleave(torch.arange(U), torch.tensor([4, 3, 0, 7, 2]))
    target_user = target_user[torch.randperm(len(target_user), generator=g)]
    assert not bool((target_user[1:] >= target_user[:-1]).all())  # really not grouped
    target = torch.randint(2, N_ITEMS, (len(target_user),), generator=g)
    target[0] = OOV
    with torch.no_grad():
        want = torch.sigmoid(model(target, hist[target_user], hist_len[target_user]))
        got = model.serve(target, target_user, hist, hist_len)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # the same candidates grouped by user score the same
        order = torch.argsort(target_user, stable=True)
        grouped = model.serve(target[order], target_user[order], hist, hist_len)
        torch.testing.assert_close(grouped, want[order], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_serve_without_history_columns(variant):
    """T = 0: hist_items (U, 0). Every candidate scores like one with an empty history."""
    model = make_model(**variant)
    target = torch.arange(2, 8)
    users = torch.tensor([0, 1, 1, 0, 2, 2])
    with torch.no_grad():
        got = model.serve(
            target, users, torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
        )
        want = torch.sigmoid(
            model(target, torch.zeros(6, 1, dtype=torch.int64), torch.zeros(6, dtype=torch.int64))
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [1, 7, 8, 9, 12, 17])
def test_serve_slices_cover_every_behaviour(T, monkeypatch):
    """The attention runs in slices of the history; with the slice floor at 1 pair every T here is
    cut into ceil(T / 8)-wide slices (some partial, some empty) and the scores and weights are still
    forward's. Several users with different lengths, interleaved."""
    monkeypatch.setattr(DIN, "_SERVE_CHUNK_PAIRS", 1)
    steps = [DIN._serve_chunk(12, T)]
    assert steps[0] == -(-T // DIN._SERVE_CHUNKS)  # the slices cover T, at most _SERVE_CHUNKS of them
    model = make_model()
    g = torch.Generator().manual_seed(T)
    U = 3
    hist_len = torch.tensor([T, 0, max(T - 3, 1)])
    hist = torch.randint(2, N_ITEMS, (U, T), generator=g)
    users = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 0, 2, 0, 0])
    target = torch.randint(2, N_ITEMS, (len(users),), generator=g)
    with torch.no_grad():
        ctr, att = model.serve_explained(target, users, hist, hist_len)
        want = model.attention(target, hist[users], hist_len[users])
        ref = torch.sigmoid(model(target, hist[users], hist_len[users]))
    torch.testing.assert_close(att, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ctr, ref, rtol=0, atol=1e-6)


def test_serve_slice_width():
    """At least T / 8 behaviours a slice, and at least _SERVE_CHUNK_PAIRS pairs: a ranking call
    (200 x 100) is cut in ~3k-pair slices, a small one runs in one slice."""
    K, P = DIN._SERVE_CHUNKS, DIN._SERVE_CHUNK_PAIRS
    assert DIN._serve_chunk(200, 100) == -(-P // 200)  # 16 behaviours, 3,200 pairs
    assert DIN._serve_chunk(50, 20) >= 20  # one slice
    assert DIN._serve_chunk(5000, 100) == -(-100 // K)  # 8 slices of 13
    assert DIN._serve_chunk(0, 100) >= 100  # no candidates: one (empty) slice


def test_serve_constant_unit_is_exactly_one():
    """serve carries the attention biases on a unit whose sigmoid must be 1.0 exactly in float32."""
    assert torch.sigmoid(torch.tensor(DIN._ONE_LOGIT, dtype=torch.float32)).item() == 1.0


def test_all_empty_histories():
    model = make_model()
    target = torch.arange(2, 6)
    hist = torch.zeros(4, 1, dtype=torch.int64)
    hist_len = torch.zeros(4, dtype=torch.int64)
    with torch.no_grad():
        a = model(target, hist, hist_len)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(model.forward_fast(target, hist, hist_len), a, rtol=0, atol=1e-6)
        # an empty history scores like a history of padding of any length
        b = model(target, torch.zeros(4, 7, dtype=torch.int64), hist_len)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_build_model_is_deterministic():
    a, b, c = make_model(seed=5), make_model(seed=5), make_model(seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.item_emb.weight, c.item_emb.weight)
    # building a model leaves the global RNG where it was
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    make_model(seed=5)
    assert torch.equal(torch.rand(3), x)


def test_padding_and_oov_rows_are_zero():
    model = make_model()
    assert torch.count_nonzero(model.item_emb.weight[PAD]) == 0
    assert torch.count_nonzero(model.item_emb.weight[OOV]) == 0


def test_config_round_trip():
    cfg = DINConfig(n_items=10, n_categories=4, pooling="sum", att_hidden=(16, 8), extra={"note": "x"})
    assert DINConfig.from_dict(cfg.to_dict()) == cfg


def test_leave_one_out_is_the_score_without_the_behaviour():
    """The reference, checked against its definition one history at a time: the ctr with the whole
    history minus the ctr with behaviour t deleted from the list (later ones move up), 0 past the end."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # scores that move when a behaviour goes
        target, hist, hist_len = make_batch(6, 7, seed=3)
        hist_len[0], hist[0] = 0, PAD
        hist_len[1], hist[1, 1:] = 1, PAD
        got = model.leave_one_out(target, hist, hist_len)
        assert got.shape == (6, 7)
        for b in range(6):
            items = hist[b, : hist_len[b]].tolist()

            def ctr(h: list[int], b: int = b) -> float:
                x = torch.tensor([h or [PAD]])
                return float(torch.sigmoid(model(target[b : b + 1], x, torch.tensor([len(h)]))))

            for t in range(7):
                want = ctr(items) - ctr(items[:t] + items[t + 1 :]) if t < len(items) else 0.0
                assert abs(float(got[b, t]) - want) <= 1e-6, (b, t)
        real = torch.arange(7).unsqueeze(0) < hist_len.unsqueeze(1)
        assert int(real.sum()) > 10 and bool((got[real] != 0).all())  # every real behaviour moved its score


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_contributions_equal_the_leave_one_out_reference(variant):
    """serve_contributions: its ctr and attention are serve_explained's, and its contribution is
    `leave_one_out` (the definition, through the paper's form), for users in any order, an empty and
    a one-behaviour history among them."""
    model = make_model(**variant)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        target, hist, hist_len = make_batch(24, 10, seed=5)
        hist_len[:6], hist[:6] = 0, PAD
        hist_len[6:12], hist[6:12, 1:] = 1, PAD
        users = torch.tensor([3, 0, 2, 1]).repeat_interleave(6)  # users interleaved with their rows
        hist_u, len_u = hist[::6], hist_len[::6]
        ctr, att, contribution = model.serve_contributions(target, users, hist_u, len_u)
        want_ctr, want_att = model.serve_explained(target, users, hist_u, len_u)
        torch.testing.assert_close(ctr, want_ctr, rtol=0, atol=1e-7)
        torch.testing.assert_close(att, want_att, rtol=0, atol=0)
        want = model.leave_one_out(target, hist_u[users], len_u[users])
        torch.testing.assert_close(contribution, want, rtol=0, atol=1e-6)
        assert float(want.abs().max()) > 1e-3  # the behaviours do move these scores
        past_end = torch.arange(10).unsqueeze(0) >= len_u[users].unsqueeze(1)
        assert bool((contribution[past_end] == 0).all())
