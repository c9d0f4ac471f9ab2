"""Deep Interest Network (Zhou et al., KDD 2018, arXiv 1706.06978) in one module.

Three forward passes over the same weights:
- `forward`: the paper's form, read top to bottom. Each target q is scored against its own tiled
  history through the local activation unit over [q, k, q-k, q*k]. `din score` uses it; it is the
  reference every other path must match.
- `forward_fast`: the same function for training, with the first attention layer split as
  (Wq+Wd)q + (Wk-Wd)k + Wp(q*k), so the [B, T, 4E] concatenation is never built.
- `serve_explained` (and `serve`, its ctr alone): the ONNX serving graph. A batch of users, each
  with many candidates; everything about a user's history is computed once per user; the item half
  of the first attention layer of all of that user's (candidate, behaviour) pairs is one GEMM
  against a per-user key matrix, and the category half is computed once per distinct category of
  the history, then gathered onto the behaviours (see `_serve_interest`).
- `serve_contributions`: the explaining graph, for the few items a request returns: the same, plus
  what removing each behaviour does to each score, exactly (`leave_one_out` is its literal reference).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from contracts.vocab import OOV, PAD


@dataclass
class DINConfig:
    n_items: int  # item vocabulary size, padding and OOV included
    n_categories: int  # category vocabulary size, padding and OOV included
    item_dim: int = 64  # item embedding width
    cate_dim: int = 64  # category embedding width; E = item_dim + cate_dim
    max_history: int = 100  # T: behaviours kept per user, newest first
    pooling: str = "attention"  # "attention" (DIN) or "sum" (the paper's BaseModel)
    att_hidden: tuple[int, ...] = (80, 40)  # local activation unit MLP
    att_softmax: bool = False  # paper §4.3: no softmax, so intensity of interest is kept
    head_input: str = "u,q,u*q"  # "u,q,u*q" or the seed's "u,q"
    head_hidden: tuple[int, ...] = (200, 80)
    head_activation: str = "dice"  # "dice" or "prelu"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, kept in checkpoints

    @property
    def embed_dim(self) -> int:
        return self.item_dim + self.cate_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["att_hidden"] = list(self.att_hidden)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DINConfig:
        d = dict(d)
        d["att_hidden"] = tuple(d.get("att_hidden", (80, 40)))
        d["head_hidden"] = tuple(d.get("head_hidden", (200, 80)))
        return cls(**d)


class Dice(nn.Module):
    """Data-adaptive activation (paper §4.3): p(x)·x + (1-p(x))·α·x with p = sigmoid(BN(x)).

    In eval mode the batch norm uses running statistics, so p is a sigmoid of an affine map.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, D) -> (B, D)"""
        p = torch.sigmoid(self.bn(x))
        return p * x + (1 - p) * self.alpha * x


class DIN(nn.Module):
    item_cate: Tensor  # a registered buffer: declared so type checkers know it is not a submodule

    def __init__(self, cfg: DINConfig, item_cate: Tensor) -> None:
        """item_cate: (n_items,) int64, the category index of every item index."""
        super().__init__()
        if item_cate.shape != (cfg.n_items,):
            raise ValueError(f"item_cate has shape {tuple(item_cate.shape)}, expected ({cfg.n_items},)")
        self.cfg = cfg
        E = cfg.embed_dim
        self.register_buffer("item_cate", item_cate.to(torch.int64).clone())
        self.item_emb = nn.Embedding(cfg.n_items, cfg.item_dim, padding_idx=PAD)
        self.cate_emb = nn.Embedding(cfg.n_categories, cfg.cate_dim, padding_idx=PAD)

        # Local activation unit: Linear(4E -> 80) -> sigmoid -> Linear(80 -> 40) -> sigmoid -> Linear(40 -> 1)
        dims = [4 * E, *cfg.att_hidden]
        self.att_layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.att_out = nn.Linear(dims[-1], 1)

        # Head: concat(u, q, u*q) -> 200 -> 80 (Dice or PReLU) -> 1
        n_in = {"u,q,u*q": 3, "u,q": 2}[cfg.head_input] * E
        hdims = [n_in, *cfg.head_hidden]
        self.head_layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hdims))
        acts: dict[str, Callable[[int], nn.Module]] = {
            "dice": Dice,
            "prelu": lambda d: nn.PReLU(d, init=0.25),
        }
        act = acts[cfg.head_activation]
        self.head_acts = nn.ModuleList(act(d) for d in cfg.head_hidden)
        self.head_out = nn.Linear(hdims[-1], 1)
        if cfg.pooling not in ("attention", "sum"):
            raise ValueError(f"pooling must be 'attention' or 'sum', got {cfg.pooling!r}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in (self.item_emb, self.cate_emb):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[PAD].zero_()
                emb.weight[OOV].zero_()  # never seen in training: a neutral vector, not noise

    # ---------------------------------------------------------------- embeddings

    def embed(self, items: Tensor) -> Tensor:
        """items: (...) int64 -> (..., E): concat(item embedding, category embedding)."""
        return torch.cat([self.item_emb(items), self.cate_emb(self.item_cate[items])], dim=-1)

    # ---------------------------------------------------------------- shared pieces

    def _att_tail(self, h: Tensor) -> Tensor:
        """h: (..., H1) output of the first attention layer, pre-activation -> (...) scores."""
        h = torch.sigmoid(h)
        for layer in self.att_layers[1:]:
            h = torch.sigmoid(layer(h))
        return self.att_out(h).squeeze(-1)

    def _pool(self, scores: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """scores (B, T), keys (B, T, E), mask (B, T) bool -> interest vector u (B, E)."""
        weights = self._weights(scores, mask)
        return torch.matmul(weights.unsqueeze(1), keys).squeeze(1)  # (B, 1, T) @ (B, T, E) -> (B, E)

    def _head(self, u: Tensor, q: Tensor) -> Tensor:
        """u (B, E), q (B, E) -> logits (B,)"""
        parts = [u, q, u * q] if self.cfg.head_input == "u,q,u*q" else [u, q]
        x = torch.cat(parts, dim=-1)  # (B, 3E)
        for layer, act in zip(self.head_layers, self.head_acts, strict=True):
            x = act(layer(x))
        return self.head_out(x).squeeze(-1)

    @staticmethod
    def _mask(hist_len: Tensor, T: int) -> Tensor:
        """hist_len (B,) -> (B, T) bool, True at real behaviours."""
        return torch.arange(T, device=hist_len.device).unsqueeze(0) < hist_len.unsqueeze(1)

    def _first_layer_split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """W = [Wq | Wk | Wd | Wp] over [q, k, q-k, q*k] -> (Wq + Wd, Wk - Wd, Wp, bias)."""
        first = self.att_layers[0]
        assert isinstance(first, nn.Linear)  # ModuleList items are typed as any Module
        Wq, Wk, Wd, Wp = first.weight.chunk(4, dim=1)  # each (H1, E)
        return Wq + Wd, Wk - Wd, Wp, first.bias

    # ---------------------------------------------------------------- the three passes

    def forward(self, target: Tensor, hist: Tensor, hist_len: Tensor) -> Tensor:
        """The paper's form. target (B,), hist (B, T) newest first, hist_len (B,) -> logits (B,)."""
        return self.forward_explained(target, hist, hist_len)[0]

    def attention(self, target: Tensor, hist: Tensor, hist_len: Tensor) -> Tensor:
        """How much each behaviour counts for each target, in the paper's form (see `forward_explained`).
        Same inputs as `forward` -> (B, T), 0 past hist_len."""
        return self.forward_explained(target, hist, hist_len)[1]

    def forward_explained(self, target: Tensor, hist: Tensor, hist_len: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s logits (B,) and the weights its pooling multiplies the history by (B, T): masked;
        after the softmax when trained with it; 1 for every real behaviour with sum pooling. One pass
        for both (`din score --explain`, export's parity reference)."""
        T = hist.shape[1]
        q = self.embed(target)  # (B, E)
        k = self.embed(hist)  # (B, T, E)
        mask = self._mask(hist_len, T)  # (B, T)
        if self.cfg.pooling == "sum":
            ones = mask.to(k.dtype)
            return self._head(self._pool(ones, k, mask), q), ones
        weights = self._weights(self._tiled_scores(q, k), mask)  # (B, T)
        return self._head(torch.matmul(weights.unsqueeze(1), k).squeeze(1), q), weights

    def _tiled_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """The local activation unit as the paper draws it: q (B, E), k (B, T, E) -> scores (B, T)."""
        qt = q.unsqueeze(1).expand(-1, k.shape[1], -1)  # (B, T, E): the target tiled against its history
        x = torch.cat([qt, k, qt - k, qt * k], dim=-1)  # (B, T, 4E)
        return self._att_tail(self.att_layers[0](x))

    def _weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        """Raw scores (..., T) and mask (..., T) -> the pooling weights (..., T), exactly as `_pool`."""
        if self.cfg.att_softmax:
            scores = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return scores.masked_fill(~mask, 0.0)  # also clears softmax's NaN on empty histories

    def forward_fast(self, target: Tensor, hist: Tensor, hist_len: Tensor) -> Tensor:
        """Same result as `forward` (to float rounding), without the (B, T, 4E) tensor. Same shapes."""
        if self.cfg.pooling == "sum":
            return self.forward(target, hist, hist_len)
        T = hist.shape[1]
        q = self.embed(target)  # (B, E)
        k = self.embed(hist)  # (B, T, E)
        Wq, Wk, Wp, b = self._first_layer_split()
        h = (q @ Wq.T + b).unsqueeze(1) + k @ Wk.T + (q.unsqueeze(1) * k) @ Wp.T  # (B, T, H1)
        scores = self._att_tail(h)  # (B, T)
        return self._head(self._pool(scores, k, self._mask(hist_len, T)), q)

    # ---------------------------------------------------------------- the serving graph

    # A pre-activation that the attention sigmoid maps to exactly 1.0 in float32 (sigmoid(30) =
    # 1 - 9e-14, which rounds to 1.0): a hidden unit fed only by it is a constant 1, and the next
    # layer's bias becomes one more row of its weight matrix. No bias Add pass over (N, T, H).
    _ONE_LOGIT = 30.0

    # The serving graph computes the attention in at most this many slices of the history, each of
    # about _SERVE_CHUNK_PAIRS (candidate, behaviour) pairs or more: ~1 MB of first-layer
    # activations (H1 + 1 floats a pair), about what one core's L2 holds next to the weights.
    _SERVE_CHUNKS = 8
    _SERVE_CHUNK_PAIRS = 3072

    @classmethod
    def _serve_chunk(cls, rows: int, T: int) -> int:
        """Behaviours per slice for `rows` candidate slots against histories of T: at least
        T / _SERVE_CHUNKS (so the slices cover T) and at least _SERVE_CHUNK_PAIRS / rows (so a small
        call is one slice and the rest are empty, not many tiny GEMMs)."""
        K = cls._SERVE_CHUNKS
        return max((T + K - 1) // K, (cls._SERVE_CHUNK_PAIRS + rows - 1) // max(rows, 1))

    @staticmethod
    def _serve_slots(target_user: Tensor, U: int, N: int) -> tuple[Tensor, int]:
        """Place every candidate in a (U, n_max) grid, one row of slots per user, in input order.

        target_user (N,) -> slot (N,) = user * n_max + rank within the user, and n_max, the most
        candidates any user has. Any order of target_user works (grouped or interleaved).
        """
        onehot = (target_user.unsqueeze(1) == torch.arange(U).unsqueeze(0)).to(torch.int64)  # (N, U)
        rank = torch.gather(onehot.cumsum(0), 1, target_user.unsqueeze(1)).squeeze(1) - 1  # (N,)
        n_max = int(onehot.sum(0).max().item()) if N > 0 else 0
        torch._check(n_max >= 0)
        torch._check(n_max <= N)
        return target_user * n_max + rank, n_max

    def _serve_categories(self, hist_items: Tensor) -> tuple[Tensor, Tensor, int]:
        """The distinct categories of each user's history, without a data-dependent op per user.

        hist_items (U, T) -> cats (U, C): each user's distinct categories in order of first
        appearance, padded with PAD; cat_slot (U, T): the column of cats holding behaviour t's
        category; C: the most distinct categories any user has.
        """
        U, T = hist_items.shape
        cate = self.item_cate[hist_items]  # (U, T)
        # One sentinel column (category -1) keeps every reduction non-empty when T = 0.
        ext = torch.cat([cate, torch.full((U, 1), -1, dtype=cate.dtype)], 1)  # (U, T+1)
        same = (ext.unsqueeze(2) == ext.unsqueeze(1)).to(torch.float32)  # (U, T+1, T+1)
        first = torch.argmax(same, dim=2)[:, :T]  # (U, T): the first position with the same category
        is_first = first == torch.arange(T).unsqueeze(0)  # (U, T)
        rank = torch.cumsum(is_first.to(torch.int64), 1) - 1  # (U, T)
        cat_slot = torch.gather(rank, 1, first)  # (U, T)
        C = int(is_first.sum(1).max().item()) if T > 0 else 0
        torch._check(C >= 0)
        torch._check(C <= T)
        cats = torch.zeros(U, T, dtype=cate.dtype).scatter(1, cat_slot, cate)[:, :C]
        return cats, cat_slot, C

    def _serve_attention_weights(self) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
        """The local activation unit in the serving graph's "ones-unit" form (weights only).

        Returns
        - pair (E, 2, H1+1): pair[e] = [Wp[:, e]; (Wq+Wd)[:, e]], then a zero column. Row e of a
          user's key matrix is [k[t, e], 1] @ pair[e], for every history position t at once.
        - hist (E+1, H1+1): [(Wk-Wd)^T; b], plus the column (0, ..., 0, ONE) that drives the
          constant unit. [k, 1] @ hist is the per-behaviour term, once per user.
        - hidden: for each later layer (H_in+1, H_out+1) = [[W^T, 0], [b, ONE]].
        - out (1, H_last+1) = [w_out, b_out].
        """
        Wq, Wk, Wp, b = self._first_layer_split()  # (H1, E) each, b (H1,)
        E = Wp.shape[1]
        zero_col = torch.zeros(E, 1, dtype=Wp.dtype)
        one = torch.full((1,), self._ONE_LOGIT, dtype=Wp.dtype)
        pair = torch.stack([torch.cat([Wp.T, zero_col], 1), torch.cat([Wq.T, zero_col], 1)], 1)
        hist = torch.cat([torch.cat([Wk.T, zero_col], 1), torch.cat([b, one]).unsqueeze(0)], 0)
        hidden = []
        for layer in self.att_layers[1:]:
            assert isinstance(layer, nn.Linear)
            W = layer.weight  # (H_out, H_in)
            top = torch.cat([W.T, torch.zeros(W.shape[1], 1, dtype=W.dtype)], 1)
            hidden.append(torch.cat([top, torch.cat([layer.bias, one]).unsqueeze(0)], 0))
        out = torch.cat([self.att_out.weight, self.att_out.bias.view(1, 1)], 1)
        return pair, hist, hidden, out

    def _serve_head(self, u: Tensor, q: Tensor) -> Tensor:
        """`_head` with Dice written as x * (alpha + p * (1 - alpha)): the same function, fewer nodes."""
        parts = [u, q, u * q] if self.cfg.head_input == "u,q,u*q" else [u, q]
        x = torch.cat(parts, dim=-1)
        for layer, act in zip(self.head_layers, self.head_acts, strict=True):
            x = layer(x)
            if isinstance(act, Dice):
                p = torch.sigmoid(act.bn(x))
                x = x * (act.alpha + p * (1 - act.alpha))
            else:
                x = act(x)
        return self.head_out(x).squeeze(-1)

    def serve(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> Tensor:
        """The serving graph's ctr alone (see `serve_explained`)."""
        return self.serve_explained(target_items, target_user, hist_items, hist_len)[0]

    def serve_explained(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The serving graph: N candidates of U users.

        target_items (N,), target_user (N,) row of hist_items, hist_items (U, T), hist_len (U,)
        -> ctr (N,) in (0, 1), equal to sigmoid(forward(target, hist[target_user], ...)), and
        attention (N, T), equal to attention(target, hist[target_user], ...): the weight of every
        behaviour for every candidate, which the pooling computes anyway (a (N, T) gather more).
        How the interest vectors are computed: `_serve_interest`.
        """
        q, _, _, u, weights, _ = self._serve_interest(target_items, target_user, hist_items, hist_len)
        return torch.sigmoid(self._serve_head(u, q)), weights

    def serve_contributions(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The explaining graph (bundle's explain.onnx): `serve_explained`'s two outputs, and
        contribution (N, T): for each candidate n and behaviour t of its user's history,
        ctr(whole history) - ctr(the history without behaviour t), in CTR space, exactly (no
        approximation: `leave_one_out` is the literal reference); 0 past hist_len. Same inputs.

        In DIN a behaviour's weight for a candidate does not depend on the other behaviours, so the
        interest vector without behaviour t needs no second pass through the attention: without
        softmax it is u - w_t k_t; with softmax the other weights are renormalised (a masked softmax
        over the same scores, not (u - w_t k_t) / (1 - w_t), which cancels catastrophically as w_t
        nears 1). Both are one (N, T, T) @ (N, T, E) product; then the head runs once more on N x T
        rows. Everything about the history is shared with the ctr: this is for the few items a
        request returns, not for every candidate (the head alone is ~93k multiply-adds a row).
        """
        q, k, mask, u, weights, scores = self._serve_interest(target_items, target_user, hist_items, hist_len)
        N, T, E = target_items.shape[0], hist_items.shape[1], self.cfg.embed_dim
        ctr = torch.sigmoid(self._serve_head(u, q))  # (N,)
        real = mask[target_user]  # (N, T)
        t = torch.arange(T)
        keep = real.unsqueeze(1) & (t.unsqueeze(0) != t.unsqueeze(1)).unsqueeze(0)  # (N, T, T): row t drops t
        if self.cfg.pooling == "sum":
            loo = keep.to(q.dtype)  # (N, T, T): every other real behaviour weighs 1
        else:
            loo = self._weights(scores.unsqueeze(1).expand(N, T, T), keep)  # (N, T, T): weights without t
        u_loo = torch.matmul(loo, k[target_user])  # (N, T, T) @ (N, T, E) -> (N, T, E)
        q_rows = q.unsqueeze(1).expand(N, T, E).reshape(-1, E)  # (N*T, E)
        ctr_loo = torch.sigmoid(self._serve_head(u_loo.reshape(-1, E), q_rows)).view(N, T)
        return ctr, weights, (ctr.unsqueeze(1) - ctr_loo).masked_fill(~real, 0.0)

    def _serve_interest(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The serving graphs' shared part: N candidates of U users (inputs as `serve_explained`) ->
        q (N, E), k (U, T, E), mask (U, T), interest vectors u (N, E), pooling weights (N, T) (0 past
        hist_len) and the raw attention scores (N, T) the weights come from (before any softmax).

        With W = [Wq | Wk | Wd | Wp] the first attention layer, its pre-activation for candidate q and
        behaviour k is (Wq+Wd) q + (Wk-Wd) k + b + Wp (q*k). For one user, all of it, for every
        (candidate, behaviour, unit), is a single GEMM:

            h[n, (t, j)] = sum_e q[n, e] K[e, (t, j)] + K[E, (t, j)]   i.e.  [q, 1] @ K
            K[e, (t, j)] = k[t, e] Wp[j, e] + (Wq+Wd)[j, e]            (E rows, built once per user)
            K[E, (t, j)] = (Wk-Wd)[j] . k[t] + b[j]                     (the per-behaviour term)

        so there is no (N, T, E) tensor and no per-candidate copy of the history. The embedding is
        [item, category], so the category rows of that GEMM depend on a behaviour only through its
        category: they are computed once per distinct category of the history (C, a handful, instead
        of T columns) and each behaviour takes its category's row (a gather and an add over
        (n, T, H1)); the GEMM over all T keeps only the item rows. Users are batched
        as (U, n_max, E+1) @ (U, E+1, T*H1): candidates are placed in a per-user grid of slots (any
        order of target_user), and the interest vectors are gathered back from it. Biases ride on a
        constant unit (see _ONE_LOGIT); the pooling is one batched GEMM.

        Everything from that GEMM to the attention scores runs in up to _SERVE_CHUNKS slices of the
        history (see _serve_chunk), so each slice's (n, t, H) activations stay in the core's cache
        between the GEMM, the gather and add, the sigmoid and the next layer, instead of a
        (U, n, T, H) tensor (6.5 MB at 200 x 100) going to memory and back four times.
        """
        U, T = hist_items.shape
        N = target_items.shape[0]
        E = self.cfg.embed_dim
        q = self.embed(target_items)  # (N, E)
        k = self.embed(hist_items)  # (U, T, E): once per user
        mask = self._mask(hist_len, T)  # (U, T)
        if self.cfg.pooling == "sum":
            ones = mask.to(k.dtype)  # (U, T)
            u_user = torch.matmul(ones.unsqueeze(1), k).squeeze(1)  # (U, E)
            return q, k, mask, u_user[target_user], ones[target_user], ones[target_user]

        pair, hist, hidden, out = self._serve_attention_weights()
        H = pair.shape[-1]  # H1 + 1 (the constant unit)
        Ei = self.cfg.item_dim
        Ec = E - Ei
        slot, n_max = self._serve_slots(target_user, U, N)
        ones = torch.ones(N, 1, dtype=q.dtype)
        grid = torch.zeros(U * n_max, Ei + 1, dtype=q.dtype)
        q_item = grid.index_put((slot,), torch.cat([q[:, :Ei], ones], 1)).view(U, n_max, Ei + 1)
        q_cate = torch.zeros(U * n_max, Ec, dtype=q.dtype).index_put((slot,), q[:, Ei:]).view(U, n_max, Ec)

        # The item half of the pair term, the per-behaviour term and the biases: [q_item, 1] @ keys.
        kt = k[..., :Ei].transpose(1, 2).unsqueeze(-1)  # (U, Ei, T, 1)
        key_pair = torch.matmul(torch.cat([kt, torch.ones_like(kt)], -1), pair[:Ei])  # (U, Ei, T, H)
        key_hist = torch.matmul(k, hist[:E]) + hist[E]  # (U, T, H)
        keys = torch.cat([key_pair, key_hist.unsqueeze(1)], 1)  # (U, Ei+1, T, H)

        # The category half depends on the behaviour only through its category: one GEMM per user
        # against the C distinct categories of its history, then every behaviour takes its row.
        cats, cat_slot, C = self._serve_categories(hist_items)  # (U, C), (U, T)
        kc = self.cate_emb(cats).transpose(1, 2).unsqueeze(-1)  # (U, Ec, C, 1)
        cate_keys = torch.matmul(torch.cat([kc, torch.ones_like(kc)], -1), pair[Ei:])  # (U, Ec, C, H)
        h_cate = torch.matmul(q_cate, cate_keys.reshape(U, Ec, C * H)).reshape(U * n_max * C, H)
        rows = torch.arange(U * n_max).view(U, n_max, 1) * C + cat_slot.unsqueeze(1)  # (U, n_max, T)

        # The first layer, its activation and the later layers, a slice of the history at a time.
        step = self._serve_chunk(U * n_max, T)
        parts = []
        for i in range(self._SERVE_CHUNKS):
            keys_i = keys[:, :, i * step : (i + 1) * step]  # (U, Ei+1, m, H); empty past T
            m = keys_i.shape[2]
            h = torch.matmul(q_item, keys_i.reshape(U, Ei + 1, m * H)).view(U, n_max, m, H)
            h = h + F.embedding(rows[:, :, i * step : (i + 1) * step], h_cate)  # the first layer
            a = torch.sigmoid(h).reshape(U * n_max * m, H)
            for W in hidden:
                a = torch.sigmoid(torch.matmul(a, W))
            parts.append(torch.matmul(out, a.T).reshape(U, n_max, m))
        scores = torch.cat(parts, 2)  # (U, n_max, T)
        raw = scores.reshape(U * n_max, T)[slot]  # (N, T)

        if self.cfg.att_softmax:
            scores = self._weights(scores, mask.unsqueeze(1))  # (U, n_max, T)
            u_grid = torch.matmul(scores, k)  # (U, n_max, E)
            weights = scores.reshape(U * n_max, T)[slot]
        else:  # zero the padded behaviours once per user instead of the (N, T) scores
            u_grid = torch.matmul(scores, k * mask.unsqueeze(-1).to(k.dtype))
            weights = raw.masked_fill(~mask[target_user], 0.0)
        u = u_grid.reshape(U * n_max, E)[slot]  # (N, E)
        return q, k, mask, u, weights, raw

    # ---------------------------------------------------------------- the reference for explanations

    def leave_one_out(self, target: Tensor, hist: Tensor, hist_len: Tensor) -> Tensor:
        """What each behaviour did to each target's score, by definition: target (B,), hist (B, T),
        hist_len (B,) -> (B, T), sigmoid(forward(whole history)) - sigmoid(forward(the history with
        behaviour t removed)), 0 past hist_len. Literally: `forward` (the paper's form) on B x T
        shortened histories; the reference for the serving graph's `contribution`."""
        B, T = hist.shape
        full = torch.sigmoid(self.forward(target, hist, hist_len))  # (B,)
        if T == 0:
            return torch.zeros(B, 0, dtype=full.dtype)
        others = [[s for s in range(T) if s != t] or [0] for t in range(T)]  # (T, max(T-1, 1))
        short = hist[:, torch.tensor(others)]  # (B, T, T-1): row t is the history without t
        if T == 1:
            short = torch.zeros_like(short)
        real = self._mask(hist_len, T)  # (B, T)
        short_len = hist_len.unsqueeze(1) - real.to(hist_len.dtype)  # (B, T): one fewer where t is real
        logits = self.forward(target.repeat_interleave(T), short.reshape(B * T, -1), short_len.reshape(-1))
        return (full.unsqueeze(1) - torch.sigmoid(logits).view(B, T)).masked_fill(~real, 0.0)


def build_model(cfg: DINConfig, item_cate: Tensor, seed: int = 0) -> DIN:
    """A freshly initialised DIN, the same weights for the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DIN(cfg, item_cate)
