"""A BERT sentence encoder run on a batch's real tokens only ("packed"), for the compiled path.

Why: a batch padded to its longest text spends the padding's share of every matrix product
on nothing, and almost all of a small BERT's arithmetic is in those products (the six layers'
linear maps: ~21 MFLOP per token for MiniLM-L6; attention over 20-40 tokens is under 2 %).
The API's dynamic batches are whatever texts concurrent requests brought, of mixed length;
cutting them into batches of similar length (``encoder._batches``) bounds the padding but
makes small batches, which run slower per text. Here the texts' tokens are concatenated, every
linear map, layer norm and GELU runs on those tokens alone, and only attention (the one step
that needs each text's tokens together) is done on a padded [texts, longest] layout, gathered
from and scattered back to the packed rows. Mean pooling is a segment sum. One text alone (a
query) needs none of that: ``forward_one`` runs it with no mask, scatter or gather.

Measured (AMD EPYC Zen 4, 2 vCPUs, bf16, compiled, 2026-12-06, both encoders in one process,
taking turns): random 20-40 token texts 16 per call 268-283 -> 323-341 texts/s, 32 per call
316-363 -> 378-391; 1,024 texts sorted first (little padding to save) 408-430 -> 420-458; demo
e-mails of up to 256 tokens 50-51 -> 49-52 (no change). The attention budget (2,048 cells
for the default batch size 16 then, 4,096 since: ``encoder.PACKED_CELLS_PER_TEXT``) was the
best of 1,024 / 2,048 / 4,096 in the same runs.

With little padding to save, packing is the slower layout: the scatter and gather around each
attention cost more than the padding's share of the linear maps. ``forward_padded`` runs such
batches (all cut at the model's limit, or sorted by length) on the padded layout, with the same
weights and pooling; ``encoder.PADDED_FILL`` picks the layout per batch.

Only for the architecture it was written against, checked on the loaded model: a BERT-style
encoder (post-layer-norm layers, absolute positions, one token type) followed by mean pooling
(and optionally normalization). Anything else, or a model whose packed vectors do not match
its own on a probe, keeps the padded path; ``PackedBert.of`` says why in the log. Imported
only by a process that compiles (it imports torch).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .encoder import PADDED_WIDTH_MULTIPLE, padded, unit_rows

log = logging.getLogger(__name__)

PROBE = ("a short probe", "a somewhat longer probe sentence, with more tokens in it than the first")


def pack(ids: list[list[int]], multiple: int = 1) -> tuple[np.ndarray, ...]:
    """The packed inputs for token-id lists: ids, positions, each token's row in the padded
    [texts, longest] layout, each token's text, the padded layout's mask, 1/length per text.
    With ``multiple`` > 1 the token count is rounded up to a multiple of it by filler texts
    after the real ones, none longer than the longest real text (the attention layout keeps its
    width); each attends to itself only, so the real rows are unchanged, and the caller drops
    the filler's rows (``encoder.PACKED_TOKEN_MULTIPLE`` says why)."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    fill = -int(lengths.sum()) % multiple
    if fill:
        filler = [width] * (fill // width) + ([fill % width] if fill % width else [])
        ids = list(ids) + [[0] * n for n in filler]
        lengths = np.concatenate([lengths, np.asarray(filler, dtype=np.int64)])
    flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(len(flat_ids), dtype=np.int64) - starts
    seg = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    rows = seg * width + pos
    valid = np.arange(width)[None, :] < lengths[:, None]
    return flat_ids, pos, rows, seg, valid, (1.0 / lengths).astype(np.float32)


def padded_layout(ids: list[list[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``PackedBert.forward_padded``'s inputs: ids [texts, width] (0 past each text's end), the
    mask of real tokens, 1/length per text; the width is the longest text rounded up to a
    multiple of ``multiple`` (``encoder.PADDED_WIDTH_MULTIPLE`` says why)."""
    flat, mask = padded(ids, 0, multiple)
    return flat, mask.astype(bool), (1.0 / mask.sum(1)).astype(np.float32)


def one_text(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``PackedBert.forward_one``'s inputs for one text's token ids."""
    return np.asarray(ids, dtype=np.int64), np.arange(len(ids), dtype=np.int64)


class PackedBert(torch.nn.Module):
    """``forward(ids, pos, rows, seg, valid, inv_len) -> [texts, hidden]`` mean-pooled float32
    token states (not normalized), for the tensors :func:`pack` makes. The model's own modules,
    shared, not copied; a module so that inductor's freezing prepacks every weight."""

    def __init__(self, bert):
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = torch.nn.ModuleList(bert.encoder.layer)
        cfg = bert.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        # q, k and v as one product: one pass over the tokens and one scatter instead of three
        attn = [layer.attention.self for layer in self.layers]
        self.qkv_weight = torch.nn.ParameterList(torch.nn.Parameter(
            torch.cat([a.query.weight, a.key.weight, a.value.weight]).detach(), requires_grad=False) for a in attn)
        self.qkv_bias = torch.nn.ParameterList(torch.nn.Parameter(
            torch.cat([a.query.bias, a.key.bias, a.value.bias]).detach(), requires_grad=False) for a in attn)

    @classmethod
    def of(cls, st_model) -> "PackedBert | None":
        """The packed encoder for a loaded sentence-transformers model, or None (logged) when
        the model is not the architecture this was written for."""
        why = _unsupported(st_model)
        if why is None:
            packed = cls(st_model[0].auto_model).eval()
            why = packed._probe(st_model)
            if why is None:
                return packed
        log.info("embedding batches stay padded: %s", why)
        return None

    def forward(self, ids, pos, rows, seg, valid, inv_len):
        x = self._embed(ids, pos)
        texts, width = valid.shape
        hidden = x.shape[1]
        mask = valid.view(texts, 1, 1, width)
        for layer, w, b in zip(self.layers, self.qkv_weight, self.qkv_bias):
            qkv = F.linear(x, w, b)
            padded = qkv.new_zeros(texts * width, 3 * hidden)
            padded[rows] = qkv
            q, k, v = padded.view(texts, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = _after_attention(layer, a.transpose(1, 2).reshape(texts * width, hidden)[rows], x)
        pooled = torch.zeros(texts, hidden, dtype=torch.float32, device=x.device).index_add_(0, seg, x.float())
        return pooled * inv_len[:, None]

    def forward_padded(self, ids, valid, inv_len):
        """The same vectors for a batch laid out padded (``padded_layout``): [texts, width]
        rows, every linear map on the padding too, and no scatter or gather around attention.
        For a batch with little padding (texts sorted by length, or all cut at the model's
        limit) that is the cheaper layout: 16 e-mails of 256 tokens ran at 1.24x the texts/s of
        packed batches of 8 (the 2,048-cell budget) and 1.14x packed batches of 16; e-mails
        under 256 tokens, sorted, 1.11x (Intel Xeon with AMX, 2 vCPUs, bf16, compiled,
        2026-12-06, one process taking turns, 16 rounds). ``encoder.PADDED_FILL`` picks it."""
        texts, width = ids.shape
        emb = self.embeddings
        x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings.weight[:width]
                          + emb.token_type_embeddings.weight[0])
        hidden = x.shape[-1]
        x = x.view(texts * width, hidden)
        mask = valid.view(texts, 1, 1, width)
        for layer, w, b in zip(self.layers, self.qkv_weight, self.qkv_bias):
            q, k, v = F.linear(x, w, b).view(texts, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = _after_attention(layer, a.transpose(1, 2).reshape(texts * width, hidden), x)
        pooled = (x.float().view(texts, width, hidden) * valid[..., None]).sum(1)
        return pooled * inv_len[:, None]

    def forward_one(self, ids, pos):
        """One text's mean-pooled float32 token states, [1, hidden] (``ids``: its token ids,
        ``pos``: 0..n-1). Nothing to pad, so no mask, scatter or gather: the graph for a query,
        where each of those steps is a kernel call of its own. Against the model's own forward
        compiled for one text (both with inductor's C++ wrapper), 600 short queries in one
        process, taking turns: p50 3.40 -> 2.69 ms and 3.58 -> 3.00 ms, p99 8.7 -> 7.1 and
        8.3 -> 7.5 ms (AMD EPYC Zen 4, 2 vCPUs, bf16, 2026-12-06); the same vector (cosine 1.0)."""
        x = self._embed(ids, pos)
        n, hidden = x.shape
        for layer, w, b in zip(self.layers, self.qkv_weight, self.qkv_bias):
            q, k, v = F.linear(x, w, b).view(1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v)
            x = _after_attention(layer, a.transpose(1, 2).reshape(n, hidden), x)
        return x.float().mean(0, keepdim=True)

    def _embed(self, ids, pos):
        emb = self.embeddings
        return emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings.weight[0])

    def _probe(self, st_model) -> str | None:
        """None if the vectors of two texts of different length, packed, padded and alone,
        match the mean of the model's own token states. Pooled here in fp32 as the packed forward pools: the
        sentence-transformers pooling sums in the model's dtype, which in bf16 alone moves a
        vector by a cosine of ~0.998 (the packed one is within 0.99995 of fp32)."""
        try:
            dev = st_model.device
            ids = [st_model.tokenizer(t)["input_ids"] for t in PROBE]
            input_ids, mask = (torch.from_numpy(a).to(dev) for a in padded(ids, st_model.tokenizer.pad_token_id or 0))
            with torch.inference_mode():
                got = self(*(torch.from_numpy(a).to(dev) for a in pack(ids))).cpu().numpy()
                laid = self.forward_padded(*(torch.from_numpy(a).to(dev)
                                             for a in padded_layout(ids, PADDED_WIDTH_MULTIPLE))).cpu().numpy()
                alone = torch.cat([self.forward_one(*(torch.from_numpy(a).to(dev) for a in one_text(x)))
                                   for x in ids]).cpu().numpy()
                tokens = st_model[0]({"input_ids": input_ids, "attention_mask": mask,
                                      "token_type_ids": torch.zeros_like(input_ids)})["token_embeddings"].float()
                want = ((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - any mismatch in structure keeps the padded path
            return f"the packed forward failed on a probe ({type(exc).__name__}: {str(exc)[:200]})"
        want = unit_rows(want)
        cos = min(float(np.min(np.sum(unit_rows(v) * want, axis=1))) for v in (got, laid, alone))
        return None if cos > 0.999 else f"packed vectors differ from the model's own on a probe (cosine {cos:.4f})"


def _after_attention(layer, a, x):
    """A BERT layer after its attention: output projection, residual and layer norm, then the
    feed-forward block, residual and layer norm (post-LN), on [tokens, hidden] rows."""
    out = layer.attention.output
    x = out.LayerNorm(out.dense(a) + x)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate.intermediate_act_fn(
        layer.intermediate.dense(x))) + x)


def _unsupported(st_model) -> str | None:
    """Why the packed forward does not fit this model (None: it does)."""
    modules = list(st_model)
    if len(modules) not in (2, 3) or not hasattr(modules[0], "auto_model"):
        return "not a transformer followed by pooling"
    bert = modules[0].auto_model
    cfg = bert.config
    if getattr(cfg, "model_type", None) != "bert" or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"model type {getattr(cfg, 'model_type', '?')} (packing is written for BERT with absolute positions)"
    pool = modules[1].get_config_dict() if hasattr(modules[1], "get_config_dict") else {}
    mean = pool.get("pooling_mode") == "mean" or (
        pool.get("pooling_mode_mean_tokens") and not any(v for k, v in pool.items()
                                                         if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"))
    if not mean or pool.get("include_prompt", True) is not True:
        return f"pooling {pool} (packing is written for mean pooling)"
    if len(modules) == 3 and type(modules[2]).__name__ != "Normalize":
        return f"a {type(modules[2]).__name__} module after pooling"
    return None
