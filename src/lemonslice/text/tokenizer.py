"""GGUF tokenizers (`gpt2` byte-level BPE and `llama` SentencePiece-style) on the `tokenizers` library.

The ids follow llama.cpp's tokenizer (vocab-only load of the same GGUF):

* Special tokens are split out first, as llama.cpp does: longest text first, user-defined
  tokens always, control/unknown tokens only with `parse_special=True`.
* `gpt2`: the pre-tokenizer regexes are llama.cpp's for `tokenizer.ggml.pre`, then byte-level
  BPE with the GGUF's merges (rank = position in the list).
* `llama`: llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation is the
  highest-scored token; that is a BPE whose merges are every split of every token, ranked by
  the merged token's score, with `<0xNN>` byte fallback. Spaces become U+2581 after the special
  split, and a space is prefixed to a text run after a special token when `add_space_prefix`.
* Input is not Unicode-normalized (llama.cpp does not; Qwen's reference tokenizer applies NFC).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Iterable, Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from ..errors import LemonsliceError
from ..gguf.constants import Keys, TokenType
from ..gguf.reader import GGUFReader

__all__ = ["PRE_REGEXES", "StreamDecoder", "Tokenizer", "TokenizerError", "byte_decoder", "byte_encoder"]

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# llama.cpp's pre-tokenizer regexes (applied in sequence) for each `tokenizer.ggml.pre` handled here.
PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "qwen2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen35": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}
PRE_REGEXES["deepseek-r1-qwen"] = PRE_REGEXES["qwen2"]

_SPM_SPACE = "\u2581"


class TokenizerError(LemonsliceError):
    """A GGUF's tokenizer metadata is missing, unsupported or inconsistent."""


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_encoder().items()}


def _kv_source(src: Any) -> tuple[Any, GGUFReader | None]:
    """A `.get(key, default)` source; a path is opened (and returned, to be closed)."""
    if isinstance(src, (str, os.PathLike)):
        r = GGUFReader(src)
        return r, r
    if isinstance(src, Mapping) or hasattr(src, "get"):
        return src, None
    raise TypeError(f"expected a GGUFReader, a path or a mapping, got {type(src).__name__}")


def _spm_merges(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best merged-token score first (ties: lower id)."""
    neg = [-float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    found: list[tuple[float, int, int, str, str]] = []
    for tok, tid in vocab.items():
        for i in range(1, len(tok)):
            a = tok[:i]
            if a in vocab:
                b = tok[i:]
                if b in vocab:
                    found.append((neg[tid], tid, i, a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


class Tokenizer:
    """Encode/decode with a GGUF's vocabulary, as llama.cpp does. Build with `from_gguf`."""

    def __init__(self, model: str, hf: HFTokenizer, tokens: Sequence[str], token_types: Sequence[int],
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool = False):
        self.model = model
        self._hf = hf
        self.tokens = list(tokens)
        self.token_types = [int(t) for t in token_types]
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        special = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        ids = [i for i, t in enumerate(self.token_types) if t in special and self.tokens[i]]
        # llama.cpp tries the longest special text first (sorted by byte length).
        ids.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._specials = [(self.tokens[i], i, self.token_types[i] == TokenType.USER_DEFINED) for i in ids]
        self._pieces: dict[int, bytes] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    # ---- construction --------------------------------------------------------------

    @classmethod
    def from_gguf(cls, src: Any) -> "Tokenizer":
        """From a `GGUFReader`, a GGUF path, or a mapping of GGUF keys to decoded values."""
        kv, owned = _kv_source(src)
        try:
            return cls._build(kv)
        finally:
            if owned is not None:
                owned.close()

    @classmethod
    def _build(cls, kv: Any) -> "Tokenizer":
        model = kv.get(Keys.TOKENIZER_MODEL)
        tokens = kv.get(Keys.TOKENIZER_TOKENS)
        if model is None or tokens is None:
            raise TokenizerError("no tokenizer.ggml.model / tokenizer.ggml.tokens in the metadata")
        tokens = list(tokens)
        types = kv.get(Keys.TOKENIZER_TOKEN_TYPE)
        types = [int(t) for t in types] if types is not None else [int(TokenType.NORMAL)] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{len(types)} token types for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}  # llama.cpp's map keeps the last id of a duplicate
        bos, eos = kv.get(Keys.BOS_ID), kv.get(Keys.EOS_ID)
        bos = None if bos is None else int(bos)
        eos = None if eos is None else int(eos)
        if model == "gpt2":
            hf = cls._gpt2(kv, vocab)
            add_bos, add_space_prefix = False, False
        elif model == "llama":
            hf = cls._spm(kv, vocab, len(tokens))
            add_bos, add_space_prefix = True, True
        else:
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r} (gpt2 and llama are)")
        add_bos = bool(kv.get(Keys.ADD_BOS, add_bos))
        add_eos = bool(kv.get(Keys.ADD_EOS, False))
        add_space_prefix = bool(kv.get(Keys.ADD_SPACE_PREFIX, add_space_prefix)) if model == "llama" else False
        return cls(model, hf, tokens, types, bos, eos, add_bos, add_eos, add_space_prefix)

    @staticmethod
    def _gpt2(kv: Any, vocab: dict[str, int]) -> HFTokenizer:
        pre = kv.get(Keys.TOKENIZER_PRE) or "default"
        if pre not in PRE_REGEXES:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r}; known: {', '.join(sorted(PRE_REGEXES))}")
        merges = []
        for m in kv.get(Keys.TOKENIZER_MERGES) or []:
            # llama.cpp splits a merge at the first space after its first character.
            k = m.find(" ", 1)
            if k < 0:
                raise TokenizerError(f"malformed merge {m!r}")
            merges.append((m[:k], m[k + 1:]))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_REGEXES[pre]]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    @staticmethod
    def _spm(kv: Any, vocab: dict[str, int], n: int) -> HFTokenizer:
        scores = kv.get(Keys.TOKENIZER_SCORES)
        if scores is None or len(scores) != n:
            raise TokenizerError("a llama (SPM) tokenizer needs one tokenizer.ggml.scores entry per token")
        unk = kv.get(Keys.UNK_ID)
        unk_tok = next((t for t, i in vocab.items() if i == int(unk)), None) if unk is not None else None
        bpe = models.BPE(vocab=vocab, merges=_spm_merges(vocab, scores), unk_token=unk_tok,
                         fuse_unk=False, byte_fallback=True)
        hf = HFTokenizer(bpe)
        hf.normalizer = normalizers.Replace(" ", _SPM_SPACE)
        return hf

    # ---- encoding ------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens as llama.cpp does: each special (longest first) is
        searched in every text fragment left so far; found ones become ids."""
        frags: list[str | int] = [text] if text else []
        for tok, tid, user_defined in self._specials:
            if not (parse_special or user_defined):
                continue
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    out.append(f)
                    continue
                parts = f.split(tok)
                for j, p in enumerate(parts):
                    if j:
                        out.append(tid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_special` adds BOS/EOS as the GGUF says; `parse_special`
        turns control-token text (e.g. "<|im_start|>") into its id instead of spelling it out."""
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                frag = " " + frag
            out.extend(self._hf.encode(frag, add_special_tokens=False).ids)
            prev_special = False
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def encode_batch(self, texts: Iterable[str], add_special: bool = True, parse_special: bool = True
                     ) -> list[list[int]]:
        return [self.encode(t, add_special, parse_special) for t in texts]

    # ---- decoding ------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes llama.cpp prints for one token; control tokens print their text only
        when `special`."""
        tid = int(token_id)
        if not 0 <= tid < len(self.tokens):
            raise IndexError(f"token id {tid} out of range [0, {len(self.tokens)})")
        kind = self.token_types[tid]
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            return self.tokens[tid].encode("utf-8") if special else b""
        if kind == TokenType.UNUSED:  # llama.cpp prints nothing for these
            return b""
        piece = self._pieces.get(tid)
        if piece is None:
            piece = self._piece(tid, kind)
            self._pieces[tid] = piece
        return piece

    def _piece(self, tid: int, kind: int) -> bytes:
        text = self.tokens[tid]
        if kind == TokenType.USER_DEFINED:
            return text.encode("utf-8")
        if kind == TokenType.BYTE:
            return bytes([int(text[3:-1], 16)]) if self.model == "llama" else text.encode("utf-8")
        if self.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode("utf-8")
        dec = byte_decoder()
        # llama.cpp keeps a character outside the byte alphabet as its UTF-8 bytes.
        return b"".join(bytes([dec[c]]) if c in dec else c.encode("utf-8") for c in text)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (bytes that are not valid UTF-8 become U+FFFD)."""
        return b"".join(self.token_bytes(i, not skip_special) for i in ids).decode("utf-8", "replace")

    def stream(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental detokenizer: `feed(id)` returns the text that is complete so far, holding
    back the bytes of a multi-byte character until its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._special = not skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id, self._special))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); resets the state."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
