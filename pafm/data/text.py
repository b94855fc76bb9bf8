"""Text embedders: a local transformers encoder (CLIP or T5) for prepared caption datasets, and a small
deterministic built-in one, so the text-conditioned (MMDiT) path runs offline on digits-captions; and the digits'
template captions.

The built-in embedder is a fixed random token table (seeded) plus sinusoidal positions; the pooled vector is the
masked mean of the token table rows. It has no learned meaning: it exists to exercise the text path end to end, not
to be a text encoder. Words are hashed into the table (crc32), so any caption embeds, and the same caption always
gives the same tensors.
"""
from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import torch

from .shards import DataError

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


def text_position_limit(path) -> tuple[int | None, str]:
    """(longest token sequence the encoder at `path` can embed, its model type): CLIP's max_position_embeddings (77),
    None for relative positions (T5).  Reads only its config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", None) or config  # a full CLIP checkpoint: its text tower decides
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return (int(limit) if limit else None), str(config.model_type)


def check_text_len(path, max_len: int) -> None:
    """Refuse a token length beyond the text encoder's position table (CLIP: 77), which would fail mid-encoding."""
    limit, kind = text_position_limit(path)
    if limit is not None and max_len > limit:
        raise DataError(f"--max-text-len {max_len} exceeds the {limit} positions (max_position_embeddings) of the "
                        f"text encoder {path} ({kind}): use --max-text-len {limit} or less")


class TransformersTextEmbedder:
    """Token embeddings, mask and pooled vector from a local transformers text encoder (CLIP or T5, or any model
    with `last_hidden_state`). The pooled vector is CLIP's pooled output (from `pooled_path` if given, as SD3 pairs
    T5 tokens with a CLIP pooled vector), else the masked mean of the token embeddings. `max_len` beyond the
    encoder's positions is refused; the pooled encoder reads at most its own positions (its vector sits at the end
    token, so truncation is what SD3 does)."""

    def __init__(self, path, max_len: int = 77, pooled_path=None, device="cpu"):
        self.path, self.max_len, self.pooled_path, self.device = str(path), max_len, pooled_path, device
        check_text_len(path, max_len)
        self.tokenizer, self.model = self._load(path)
        self.pooled, self.pooled_len = None, max_len
        if pooled_path:
            self.pooled = self._load(pooled_path)
            pooled_limit = text_position_limit(pooled_path)[0] or max_len
            self.pooled_len = min(max_len, self.pooled[0].model_max_length, pooled_limit)

    def _load(self, path):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        config = AutoConfig.from_pretrained(path)
        cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "clip_text_model": CLIPTextModel}.get(
            config.model_type, AutoModel)
        return AutoTokenizer.from_pretrained(path), cls.from_pretrained(path).to(self.device).eval()

    @property
    def config(self) -> dict:
        return {"kind": "transformers", "path": self.path, "pooled_path": self.pooled_path and str(self.pooled_path),
                "max_len": self.max_len}

    @staticmethod
    def _run(tokenizer, model, captions, max_len, device):
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        mask = enc["attention_mask"].to(device)
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask)
        return out, mask.bool()

    @torch.no_grad()
    def embed(self, captions: list[str]):
        out, mask = self._run(self.tokenizer, self.model, captions, self.max_len, self.device)
        tokens = out.last_hidden_state.float()
        if self.pooled is not None:
            tok, model = self.pooled
            pooled_out, _ = self._run(tok, model, captions, self.pooled_len, self.device)
            pooled = pooled_out.pooler_output.float()
        elif getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output.float()
        else:
            m = mask.unsqueeze(-1).float()
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
        return tokens.cpu(), mask.cpu(), pooled.cpu()


def text_embedder_from_info(info: dict):
    """The embedder that produced a text dataset (`info["text_encoder"]`), to embed new prompts at sampling time.

    Built-in: a `BuiltinTextEmbedder`. transformers encoders: loaded from the recorded local folders, which must
    exist on this machine (transformers would take a missing folder for a hub name and download it).
    """
    spec = info.get("text_encoder")
    if not spec:
        raise ValueError("dataset info has no 'text_encoder' entry (not a text dataset?)")
    if spec["kind"] == "builtin":
        return BuiltinTextEmbedder(spec["dim"], spec["max_len"], spec["vocab_size"], spec["seed"])
    for key in ("path", "pooled_path"):
        if spec.get(key) and not Path(spec[key]).is_dir():
            raise ValueError(f"the dataset's text encoder folder {spec[key]} (info['text_encoder'][{key!r}]) does not "
                             f"exist on this machine; copy the transformers folder there")
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
