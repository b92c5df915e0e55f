"""How texts become vectors: batches of similar token length, eager or compiled.

Why not ``SentenceTransformer.encode``: it sorts texts by characters and pads each batch
of 32 to its longest text; batches of 16 sorted by token count waste less, and in bf16 run
about 1.3x its texts/s on 2 cores (bench/embedding_backends.py).

Why compile: eager torch spends most of a bf16 forward pass outside the matrix units (bias
copies, GELU, layer norm, each a separate pass over memory). ``torch.compile`` with
frozen weights fuses them: about 5.4x the texts/s of the fp32 sentence-transformers path,
recall@10 0.986 against it. Compiling costs 3-5 s per input shape, so compiled shapes are
fixed: full batches, padded to a multiple of ``GRANULE`` tokens (8 graphs for a 256-token
model). Only the long-lived embedding server compiles, once at start, while it serves the
same code eager; a run embedding in its own process would pay the compile every time.
Compiling needs a C++ compiler for the CPU; without one, or on any compile error, the
reason is logged and the eager path stays. Eager and compiled vectors are within bf16
rounding of each other and share the model id (tests/test_encoder.py measures it).

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

GRANULE = 32
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
    ``warm()`` has compiled it, then on fixed-shape compiled graphs, except a batch of fewer
    texts than ``eager_below``. A compiled graph has one batch size, so a single text is padded
    to a whole batch: on an AMD EPYC with bf16 units (2026-12-05) one 20-40 token text took 40 ms
    compiled against 9 ms eager, and an API answering one text per request paid that. Where the
    line lies depends on the CPU (an Intel Xeon with AMX gained 5.4x from compiling), so
    ``warm()`` measures it instead of guessing."""

    def __init__(self, st_model, batch_size: int):
        self._st = st_model
        self._max_len = int(st_model.max_seq_length)
        self.batch_size = batch_size
        self.compiled = False
        self.compile_error: str | None = None
        self.compile_seconds: float | None = None
        self._fn = self._forward
        self._lock = threading.Lock()
        self.granule = GRANULE
        self.eager_below = 0  # batches of fewer texts run eager (measured by warm())

    def _forward(self, input_ids, attention_mask, token_type_ids):
        out = self._st({"input_ids": input_ids, "attention_mask": attention_mask,
                        "token_type_ids": token_type_ids})["sentence_embedding"]
        return out.float()

    def lengths(self) -> list[int]:
        """The padded lengths compiled graphs exist for."""
        g = self.granule
        return sorted({min(self._max_len, x) for x in range(g, self._max_len + g, g)})

    def warm(self, granule: int = GRANULE) -> bool:
        """Compile every shape (padded lengths in steps of ``granule`` tokens: a coarser step
        compiles fewer graphs, at start, and pads more per batch); afterwards ``encode`` uses the
        compiled graphs. Never raises: on failure the reason is in ``compile_error`` and the
        eager path stays."""
        with self._lock:
            if self.compiled:
                return True
            if granule < 8 or granule % 8:
                self.compile_error = f"compile granule must be a positive multiple of 8 tokens, not {granule}"
                return False
            self.granule = granule
        t0 = time.perf_counter()
        try:
            import torch
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            if self._st.device.type == "cpu" and not compiler_available():
                raise RuntimeError("no C++ compiler on PATH (c++, g++ or clang++); torch.compile needs one on CPU")
            inductor_config.freezing = True  # weights as constants: inductor prepacks and fuses them
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(self.lengths()) + 4)
            fn = torch.compile(self._forward, dynamic=False)
            with torch.inference_mode():
                for length in self.lengths():
                    ids = torch.full((self.batch_size, length), 100, dtype=torch.long, device=self._st.device)
                    fn(ids, torch.ones_like(ids), torch.zeros_like(ids))
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the eager path
            self.compile_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("embedding model not compiled, running eager: %s", self.compile_error)
            return False
        eager_below = self._eager_below(fn)
        with self._lock:
            self._fn = fn
            self.eager_below = eager_below
            self.compiled = True
        self.compile_seconds = round(time.perf_counter() - t0, 1)
        log.info("embedding model compiled for %d shapes in %.1f s; batches under %d texts run eager",
                 len(self.lengths()), self.compile_seconds, eager_below)
        return True

    def _eager_below(self, compiled) -> int:
        """The fewest texts for which the compiled graph (a full batch, the shortest length) is
        not slower than the eager model on just those texts: smaller batches run eager. Each
        timing is the best of three, after one call to settle."""
        import torch

        length = self.lengths()[0]

        def seconds(fn, rows: int) -> float:
            with torch.inference_mode():
                ids = torch.full((rows, length), 100, dtype=torch.long, device=self._st.device)
                args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
                fn(*args)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    fn(*args)
                    best = min(best, time.perf_counter() - t)
            return best

        full = seconds(compiled, self.batch_size)
        for rows in (1, 2, 4, 8):
            if rows >= self.batch_size or seconds(self._forward, rows) >= full:
                return rows
        return self.batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, in input order."""
        import torch

        with self._lock:
            fn, fixed, eager_below = self._fn, self.compiled, self.eager_below
        dev = self._st.device
        eager = self._forward

        def infer(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            # tensors made inside inference mode, as in warm(): the compiled graphs' guards check
            # the dispatch keys, and a normal tensor would recompile every shape
            run = fn if fixed and input_ids.shape[0] == self.batch_size else eager  # padded: a compiled shape
            with torch.inference_mode():
                ids_t = torch.from_numpy(input_ids).to(dev)
                return run(ids_t, torch.from_numpy(mask).to(dev), torch.zeros_like(ids_t)).cpu().numpy()

        return encode_in_batches(self._st.tokenizer, self._max_len, self.batch_size, texts,
                                 self._st.get_embedding_dimension(), infer, fixed_shapes=fixed, granule=self.granule,
                                 eager_below=eager_below)


MIN_FILL = 0.8  # a text shorter than this share of its batch's longest starts a new batch


def _batches(lengths: list[int], order: np.ndarray, batch_size: int, fixed_shapes: bool) -> list[np.ndarray]:
    """Indices (longest first) cut into batches of at most ``batch_size`` texts of similar
    length. Sorting alone leaves little padding when there are many texts; a few texts of
    mixed lengths (the API's dynamic batches: 16 short texts from 16 requests) padded to the
    longest ran at 17 texts/s, cut where a text is under ``MIN_FILL`` of the longest at 32/s,
    on two cores (bench/serving.py texts). Many texts at once lose nothing: 256 demo e-mails
    per call, three rounds each, median 9.7 texts/s without the cut and 10.7 with it (AMD
    EPYC, 2026-12-03). Compiled graphs keep full batches (their shapes)."""
    if fixed_shapes:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    out, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or end - start == batch_size or lengths[order[end]] < MIN_FILL * lengths[order[start]]:
            out.append(order[start:end])
            start = end
    return out


def encode_in_batches(tokenizer, max_len: int, batch_size: int, texts: Sequence[str], dim: int, infer,
                      fixed_shapes: bool = False, granule: int = GRANULE, eager_below: int = 0) -> np.ndarray:
    """Texts sorted by token count, cut into batches, run through ``infer(input_ids, mask)``
    (int64 arrays) and put back in input order, L2-normalized in fp32. ``fixed_shapes``: batches
    padded to ``batch_size`` rows and whole granules (the shapes compiled graphs exist for),
    except a batch of fewer than ``eager_below`` texts, left as it is."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    ids = tokenize_truncated(tokenizer, texts, max_len)
    order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: little padding
    pad_id = tokenizer.pad_token_id or 0
    for idx in _batches([len(x) for x in ids], order, batch_size, fixed_shapes):
        longest = len(ids[idx[0]])
        pad = fixed_shapes and len(idx) >= eager_below
        length = min(max_len, -(-longest // granule) * granule) if pad else longest
        rows = batch_size if pad else len(idx)
        input_ids = np.full((rows, length), pad_id, dtype=np.int64)
        mask = np.zeros((rows, length), dtype=np.int64)
        for row, i in enumerate(idx):
            input_ids[row, :len(ids[i])] = ids[i]
            mask[row, :len(ids[i])] = 1
        input_ids[len(idx):], mask[len(idx):] = input_ids[0], mask[0]  # filler rows, dropped
        out[idx] = infer(input_ids, mask)[:len(idx)]
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # in fp32: bf16 norms are ~3 digits
    return out
