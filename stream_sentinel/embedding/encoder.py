"""How texts become vectors: batches of similar token length, eager or compiled.

Why not ``SentenceTransformer.encode``: it sorts texts by characters and pads each batch
of 32 to its longest text; batches of 16 sorted by token count waste less, and in bf16 run
about 1.3x its texts/s on 2 cores (bench/embedding_backends.py).

Why compile: eager torch spends much of a bf16 forward pass outside the matrix units (bias
copies, GELU, layer norm, each a separate pass over memory, each dispatched from Python).
``torch.compile`` with frozen weights prepacks the weights for the CPU's matrix kernels and
fuses the rest. Compiled graphs of dynamic shape serve every shape, so nothing is padded to a
compiled shape: one for a single text, whose ~50 kernels are called from a C++ wrapper (a query
is latency), and batch graphs called from Python (a C++ wrapper made them 10 % slower). When the
model is the BERT-with-mean-pooling packed.py was written for, there are two batch graphs: one
on the batch's real tokens only (packed: no padding in the matrix products; the count rounded up
to a multiple of 32, so that oneDNN builds kernels for a few dozen counts once:
``PACKED_TOKEN_MULTIPLE``) for batches of mixed length, and one on the padded layout for
batches with little padding (``PADDED_FILL``); the one-text graph runs the text alone (no mask,
scatter or gather: 3.4 -> 2.7 ms p50). Else the model's own forward serves batches padded to
their longest text and one text. On an AMD EPYC with bf16 units (2026-12-05) one short query took 2.7 ms p50
against 5.7 eager, and batches of 16 e-mails ran at 1.1x the eager texts/s.
Compiling costs about 25-35 s of CPU on 2 cores, once per process, so only long-lived processes
compile (the embedding server and the API), in the background, serving eager meanwhile.
Compiling needs a C++ compiler for the CPU; without one, or on any compile error, the reason
is logged and the eager path stays. Eager and compiled vectors are within bf16 rounding of
each other and share the model id (tests/test_encoder.py measures it).

Why not fixed shapes (what this module did until 2026-12-05): a compiled graph of fixed shape
pads every batch to it. On the AMX Xeon that measured 5.4x over fp32 that did not matter for
full batches of e-mails, but one 20-40 token text took 40 ms padded against 9 ms eager on the
EPYC, and eight shapes took 73 s to compile. What the fixed shapes had been faster at on AMX
(full batches of e-mails, 1.2-1.3x the packed graph) was the padded layout and 16 e-mails per
batch, not the fixed shape: the padded graph of dynamic shape ran them at 1.04-1.07x a fixed
[16, 256] graph of the model's own forward (model alone, 20 rounds taking turns, 2026-12-06).

Tokenizing a whole e-mail only to keep its first 256 tokens is about a fifth of the
tokenizer's time on the demo data. ``tokenize_truncated`` cuts long texts at a word
boundary first, and trusts the cut only when it still holds a margin of tokens past the
limit; otherwise it tokenizes the whole text. Its output equals the tokenizer's own
truncation (tested on every demo text).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_CUT = 8  # a cut at 8 chars per token keeps >= the limit for prose; checked anyway
MARGIN = 8  # tokens past the limit a cut text must still hold to be trusted


def compiler_available() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def tokenize_truncated(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with special tokens, equal to ``tokenizer(texts, truncation=True,
    max_length=max_len)["input_ids"]``, without tokenizing the tail of long texts."""
    head, tail = _special_tokens(tokenizer)
    body_len = max_len - len(head) - len(tail)
    cut_at = (body_len + MARGIN) * CHARS_PER_TOKEN_CUT
    cut = []
    for t in texts:
        if len(t) <= cut_at:
            cut.append(t)
            continue
        space = t.rfind(" ", 0, cut_at)
        cut.append(t[:space] if space > 0 else t)
    bodies = tokenizer(cut, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    redo = [i for i, (t, c, b) in enumerate(zip(texts, cut, bodies))
            if len(c) < len(t) and len(b) < body_len + MARGIN]
    if redo:
        full = tokenizer([texts[i] for i in redo], add_special_tokens=False, truncation=False,
                         verbose=False)["input_ids"]
        for i, b in zip(redo, full):
            bodies[i] = b
    return [head + b[:body_len] + tail for b in bodies]


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a single-text template puts before and after the text's own tokens."""
    body = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(body) + 1):
        if full[start:start + len(body)] == body:
            return full[:start], full[start + len(body):]
    raise ValueError("cannot find the text inside the tokenizer's special-token template")


class Encoder:
    """A loaded sentence-transformers model run on token-length batches: eager until
    ``warm()`` has compiled it, then compiled for every batch."""

    def __init__(self, st_model, batch_size: int):
        self._st = st_model
        self._max_len = int(st_model.max_seq_length)
        self.batch_size = batch_size
        self.compiled = False
        self.compile_error: str | None = None
        self.compile_seconds: float | None = None
        self.packed = False  # batches run packed (packed.py): set when compiled with it
        self._infer = self._infer_with(self._forward, self._padded_inputs)
        self._lock = threading.Lock()

    def _forward(self, input_ids, attention_mask, token_type_ids):
        out = self._st({"input_ids": input_ids, "attention_mask": attention_mask,
                        "token_type_ids": token_type_ids})["sentence_embedding"]
        return out.float()

    def _forward_one(self, input_ids, attention_mask, token_type_ids):
        return self._forward(input_ids, attention_mask, token_type_ids)  # its own code: its own compiled graph

    def _warm_ids(self) -> tuple[list[int], list[int]]:
        """Two texts of the model's own tokens, 3 and 7 between its special tokens: the sizes
        a graph is first run with are all different (x and x + 4 tokens, x >= 3, and their
        sum), so that no two dimensions are traced as one symbol (dynamo's duck sizing) and
        every later shape runs the same graph."""
        head, tail = _special_tokens(self._st.tokenizer)
        body = self._st.tokenizer("warm up the compiled graph with a few more words",
                                  add_special_tokens=False)["input_ids"]
        return head + body[:3] + tail, head + body[:7] + tail

    def _compile_one(self, graph, inputs, fallback):
        """The infer for one text: ``graph`` (compiled with inductor's C++ wrapper: ~50 kernel
        calls from C++ instead of Python took one query from 3.3 to 2.7 ms p50 and 5.2 to 4.3 ms
        p99, but batches from 460 to 418 short texts/s (AMD EPYC, 2026-12-05), so batches keep
        the Python wrapper) on ``inputs(ids)``. If it fails to build, ``fallback`` (the batch
        graph's infer), run once now so that its one-text shape is compiled at warm-up too."""
        text = self._warm_ids()[0]
        try:
            one = self._infer_with(graph, inputs)
            one([text])
            return one
        except Exception as exc:  # noqa: BLE001 - the batch graph serves one text too
            log.warning("one-text graph not built with the C++ wrapper (%s: %s); using the batch graph",
                        type(exc).__name__, str(exc)[:300])
            fallback([text])
            return fallback

    def warm(self) -> bool:
        """Compile the model for any batch shape; afterwards ``encode`` uses the compiled graphs.
        Never raises: on failure the reason is in ``compile_error`` and the eager path stays."""
        with self._lock:
            if self.compiled:
                return True
        t0 = time.perf_counter()
        try:
            import torch
            import torch._inductor.config as inductor_config

            if self._st.device.type == "cpu" and not compiler_available():
                raise RuntimeError("no C++ compiler on PATH (c++, g++ or clang++); torch.compile needs one on CPU")
            inductor_config.freezing = True  # weights as constants: inductor prepacks and fuses them
            from .packed import PackedBert, one_text, pack, padded_layout

            packed = PackedBert.of(self._st)
            if packed is not None:  # packed batches, and one text without padding (packed.py)
                batch, batch_inputs = packed, lambda ids: pack(ids, PACKED_TOKEN_MULTIPLE)
                single, single_inputs = packed.forward_one, lambda ids: one_text(ids[0])
            else:
                batch, batch_inputs = self._forward, self._padded_inputs
                single, single_inputs = self._forward_one, self._padded_inputs
            many = self._infer_with(torch.compile(batch, dynamic=True), batch_inputs)
            many(list(self._warm_ids()))
            if packed is not None:  # full batches run padded: no scatter or gather (forward_padded)
                full = self._infer_with(torch.compile(packed.forward_padded, dynamic=True),
                                        lambda ids: padded_layout(ids, PADDED_WIDTH_MULTIPLE))
                full(list(self._warm_ids()))
                many = _by_fill(full, many)
            one = self._compile_one(torch.compile(single, dynamic=True, options={"cpp_wrapper": True}),
                                    single_inputs, many)
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the eager path
            self.compile_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("embedding model not compiled, running eager: %s", self.compile_error)
            return False
        with self._lock:
            self._infer = lambda ids: (one if len(ids) == 1 else many)(ids)  # a batch of one: its own graph
            self.packed = packed is not None
            self.compiled = True
        self.compile_seconds = round(time.perf_counter() - t0, 1)
        log.info("embedding model compiled in %.1f s", self.compile_seconds)
        return True

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, in input order."""
        with self._lock:
            infer, packed = self._infer, self.packed
        return encode_in_batches(self._st.tokenizer, self._max_len, self.batch_size, texts,
                                 self._st.get_embedding_dimension(), infer, packed=packed)

    def _padded_inputs(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return model_inputs(ids, self._st.tokenizer.pad_token_id or 0)

    def _infer_with(self, graph, inputs):
        """``infer(token id lists) -> float32 rows``: ``graph`` run on the tensors of ``inputs(ids)``.
        The tensors are made inside inference mode, as at warm-up: the compiled graphs' guards
        check the dispatch keys, and a normal tensor would compile again."""
        import torch

        dev = self._st.device

        def infer(ids: list[list[int]]) -> np.ndarray:  # rows past len(ids): pack()'s filler
            with torch.inference_mode():
                return graph(*(torch.from_numpy(a).to(dev) for a in inputs(ids)))[:len(ids)].cpu().numpy()
        return infer


MIN_FILL = 0.8  # a text shorter than this share of its batch's longest starts a new batch
# A compiled batch whose tokens fill at least this share of its padded layout (texts x longest,
# rounded up to PADDED_WIDTH_MULTIPLE) runs padded (packed.PackedBert.forward_padded), any
# other packed. Why: packing saves the padding's share of every linear map but pays a scatter
# and a gather around each attention; with little padding to save, that costs more than it
# saves. Batches of texts sorted by length (any bulk call) and of texts cut at the model's limit
# (documents longer than 256 tokens) are nearly full; the API's dynamic batches of short texts
# of mixed length are not (20-40 token texts fill ~0.75), and stay packed.
PADDED_FILL = 0.9
# The padded layout's width is rounded up to a multiple of this many tokens, so that its batches
# bring a bounded set of token counts to oneDNN's kernel cache (``PACKED_TOKEN_MULTIPLE``).
PADDED_WIDTH_MULTIPLE = 8
# A packed batch's token count is rounded up to a multiple of this (filler texts, dropped after).
# Why: oneDNN builds a matrix kernel for every new number of rows it meets (the linear maps run
# on [tokens, hidden]) and keeps it in its kernel cache. On an Intel Xeon with AMX (2026-12-06)
# building the four of a new token count took ~31 ms against ~20 ms for running a batch of 16
# short texts, and the API's dynamic batches bring a new count almost every time: random 16-text
# batches ran at 290-370 texts/s, the same batch repeated at 470. Rounded to 32, a few dozen
# counts cover every batch (at most 2,048 + 31 tokens) and are built once: 16-text batches
# 365-620 texts/s, 32-text 444-577 against 331-494, 1,000 short texts sorted 474-605 against
# 379-403, e-mails unchanged (one process, taking turns, three rounds). The filler costs at
# most 31 tokens of linear work per batch (~3 % of 16 short texts).
PACKED_TOKEN_MULTIPLE = 32
# Room in oneDNN's kernel cache (default 1,024 kernels) for every shape a compiled server meets:
# eight kernels per token count (four maps, each with the matrix product it wraps), so the
# default held the ~66 rounded batch counts and only ~60 lengths of one text alone, and a server
# seeing queries of many lengths built the same kernels again and again (~15 ms per length on
# the AMX Xeon). 4,096 holds every length up to 256 beside the batches: one-text calls over all
# 254 lengths a second time took 2.3 s against 5.7 s, for ~240 MB more memory once all are held.
KERNEL_CACHE = 4096
PACKED_CELLS_PER_TEXT = 256  # a compiled batch: at most batch size x this many [texts x longest] cells


def keep_kernels() -> None:
    """Make oneDNN's kernel cache hold ``KERNEL_CACHE`` kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
    unless set already). For a long-lived process that compiles its model; oneDNN reads the
    setting once, at its first kernel, so this runs before the model is loaded."""
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fill(ids: list[list[int]]) -> float:
    """The share of a padded layout's cells (texts x longest, rounded to
    ``PADDED_WIDTH_MULTIPLE``) that hold real tokens."""
    width = round_up(max(len(x) for x in ids), PADDED_WIDTH_MULTIPLE)
    return sum(len(x) for x in ids) / (len(ids) * width)


def _by_fill(padded_infer, packed_infer):
    """An infer running a batch padded when it fills ``PADDED_FILL`` of that layout, else packed."""
    return lambda ids: (padded_infer if fill(ids) >= PADDED_FILL else packed_infer)(ids)


def padded(ids: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and attention mask, each text padded to the longest (rounded up to a multiple
    of ``multiple``)."""
    width = round_up(max(len(x) for x in ids), multiple)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
    return input_ids, mask


def model_inputs(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A BERT-style model's inputs for a batch (the torch model's and the ONNX graph's): ids and
    attention mask padded to the longest text, and token types (all 0: one segment)."""
    input_ids, mask = padded(ids, pad_id)
    return input_ids, mask, np.zeros_like(input_ids)


def _packed_batches(lengths: list[int], order: np.ndarray, cells: int) -> list[np.ndarray]:
    """Indices (longest first) cut where a batch's padded attention layout (texts x longest)
    would pass ``cells``: packing makes padding free for everything but attention, so a compiled
    batch is bounded by that layout rather than by a count of texts. The bound is the batch
    size times ``PACKED_CELLS_PER_TEXT``: 4,096 for the default 16, ~100 short texts or 16
    e-mails of 256 tokens. 2,048 (8 such e-mails) had been the best of 1,024 / 2,048 / 4,096 for
    packed batches on an AMD EPYC (packed.py); on the AMX Xeon 16 e-mails of 256 tokens ran at
    1.12x the texts/s of 8 padded and 1.07-1.09x packed (model alone, 16-20 rounds taking
    turns, 2026-12-06), and short texts were no slower (``encode``, packed layout alone, two
    runs of 6 and 12 rounds: 500 sorted short texts 1.15x and 0.98x, e-mails 1.19x and 1.01x)."""
    out, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end - start + 1) * lengths[order[start]] > cells:
            out.append(order[start:end])
            start = end
    return out


def _batches(lengths: list[int], order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices (longest first) cut into batches of at most ``batch_size`` texts of similar
    length. Sorting alone leaves little padding when there are many texts; a few texts of
    mixed lengths (the API's dynamic batches: 16 short texts from 16 requests) padded to the
    longest ran at 17 texts/s, cut where a text is under ``MIN_FILL`` of the longest at 32/s,
    on two cores (bench/serving.py texts). Many texts at once lose nothing: 256 demo e-mails
    per call, three rounds each, median 9.7 texts/s without the cut and 10.7 with it (AMD
    EPYC, 2026-12-03)."""
    out, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or end - start == batch_size or lengths[order[end]] < MIN_FILL * lengths[order[start]]:
            out.append(order[start:end])
            start = end
    return out


def encode_in_batches(tokenizer, max_len: int, batch_size: int, texts: Sequence[str], dim: int,
                      infer, packed: bool = False) -> np.ndarray:
    """Texts sorted by token count, cut into batches (of ``batch_size`` similar lengths, or for
    a ``packed`` infer by ``batch_size`` x ``PACKED_CELLS_PER_TEXT`` attention cells, each then
    run packed or padded by its fill), run through ``infer(token id lists)`` and put
    back in input order, L2-normalized in fp32."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    ids = tokenize_truncated(tokenizer, texts, max_len)
    order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: little padding
    lengths = [len(x) for x in ids]
    cut = (_packed_batches(lengths, order, batch_size * PACKED_CELLS_PER_TEXT) if packed
           else _batches(lengths, order, batch_size))
    for idx in cut:
        out[idx] = infer([ids[i] for i in idx])
    return unit_rows(out)  # in fp32: bf16 norms are ~3 digits


def unit_rows(a: np.ndarray) -> np.ndarray:
    """``a``'s rows scaled to length 1 in place (an all-zero row stays zero); ``a`` returned."""
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return a
