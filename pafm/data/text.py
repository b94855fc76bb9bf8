"""A small deterministic text embedder, so the text-conditioned (MMDiT) path runs offline on digits-captions.

It is a fixed random token table (seeded) plus sinusoidal positions; the pooled vector is the masked mean of the
token table rows. It has no learned meaning: it exists to exercise the text path end to end, not to be a text encoder.
Words are hashed into the table (crc32), so any caption embeds, and the same caption always gives the same tensors.
"""
from __future__ import annotations

import math
import re
import zlib

import torch

_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def tokenize(caption: str) -> list[str]:
    """Lower-case words, single digits and punctuation marks."""
    return _WORD.findall(caption.lower())


class BuiltinTextEmbedder:
    """`embed(captions) -> (tokens (N, L, D), mask (N, L) bool, pooled (N, D))`: float32 (holding fp16-exact values),
    deterministic; padding tokens are zero."""

    kind = "builtin"

    def __init__(self, dim: int = 32, max_len: int = 16, vocab_size: int = 4096, seed: int = 0):
        if dim < 2 or dim % 2 or max_len < 1 or vocab_size < 2:
            raise ValueError(f"builtin text embedder needs an even dim >= 2, max_len >= 1, vocab_size >= 2; got "
                             f"dim={dim} max_len={max_len} vocab_size={vocab_size}")
        self.dim, self.max_len, self.vocab_size, self.seed = dim, max_len, vocab_size, seed
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, dim, generator=g, dtype=torch.float32)
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        pe = torch.zeros(max_len, dim, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.positions = (0.5 * pe).float()

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "max_len": self.max_len, "vocab_size": self.vocab_size,
                "seed": self.seed}

    def token_ids(self, caption: str) -> list[int]:
        return [zlib.crc32(w.encode("utf-8")) % self.vocab_size for w in tokenize(caption)][: self.max_len]

    def __call__(self, captions: list[str]):
        return self.embed(captions)

    def embed(self, captions: list[str]):
        n = len(captions)
        tokens = torch.zeros(n, self.max_len, self.dim)
        mask = torch.zeros(n, self.max_len, dtype=torch.bool)
        pooled = torch.zeros(n, self.dim)
        for i, caption in enumerate(captions):
            ids = self.token_ids(caption)
            if not ids:
                continue
            rows = self.table[torch.tensor(ids)]
            tokens[i, : len(ids)] = rows + self.positions[: len(ids)]
            mask[i, : len(ids)] = True
            pooled[i] = rows.mean(0)
        # Rounded to fp16 values so that the fp16 copies stored in a dataset equal what a prompt embeds to.
        return tokens.half().float(), mask, pooled.half().float()


def text_embedder_from_info(info: dict):
    """The embedder that produced a text dataset (`info["text_encoder"]`), to embed new prompts at sampling time.

    Built-in: a `BuiltinTextEmbedder`. transformers encoders: loaded from the recorded local path (see pafm.prep).
    """
    spec = info.get("text_encoder")
    if not spec:
        raise ValueError("dataset info has no 'text_encoder' entry (not a text dataset?)")
    if spec["kind"] == "builtin":
        return BuiltinTextEmbedder(spec["dim"], spec["max_len"], spec["vocab_size"], spec["seed"])
    from pafm.prep import TransformersTextEmbedder  # heavy imports only when needed

    return TransformersTextEmbedder(spec["path"], max_len=spec["max_len"], pooled_path=spec.get("pooled_path"))


# ------------------------------------------------------------------------------------------------ digit captions

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEMPLATES = [
    "a handwritten {word}",
    "the digit {digit}, written {style}",
    "a {style} {word}",
    "a small {style} handwritten digit {digit}",
    "{word}, drawn by hand",
    "an 8 by 8 image of the number {word}",
]


def digit_caption(label: int, style: str, variant: int) -> str:
    """A template caption for a digit; `style` is 'thin', 'thick' or 'plain' (from the ink amount)."""
    template = _TEMPLATES[variant % len(_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[label], digit=label, style=style)
