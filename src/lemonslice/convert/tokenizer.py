"""tokenizer.json (+ tokenizer_config.json, config.json) -> GGUF `gpt2` BPE tokenizer metadata.

Follows the rules of llama.cpp's converter: ids the tokenizer lacks below the model's
vocab size become `[PAD<id>]` unused tokens; added tokens are control tokens when
special (or `<|...|>`-shaped) and user-defined otherwise; special ids come from
tokenizer_config.json first, then config.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LemonsliceError
from ..gguf.constants import Keys, TokenType, ValueType
from ..gguf.writer import encode_kv
from .hf import read_json

log = logging.getLogger(__name__)

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")
_ID_KEYS = {"bos": Keys.BOS_ID, "eos": Keys.EOS_ID, "unk": Keys.UNK_ID, "pad": Keys.PAD_ID}
_ADD_KEYS = {"bos": Keys.ADD_BOS, "eos": Keys.ADD_EOS}
# A space inside a merge part is written as the byte-level alphabet's space, as llama.cpp reads merges split on ' '.
_SPACE = chr(ord(" ") + 256)


@dataclass(frozen=True)
class TokenizerMeta:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_special: dict[str, bool]
    chat_template: str | None

    def kv_records(self, pre: str) -> list[bytes]:
        recs = [
            encode_kv(Keys.TOKENIZER_MODEL, ValueType.STRING, "gpt2"),
            encode_kv(Keys.TOKENIZER_PRE, ValueType.STRING, pre),
            encode_kv(Keys.TOKENIZER_TOKENS, ValueType.ARRAY, self.tokens, ValueType.STRING),
            encode_kv(Keys.TOKENIZER_TOKEN_TYPE, ValueType.ARRAY, self.token_types, ValueType.INT32),
        ]
        if self.merges:
            recs.append(encode_kv(Keys.TOKENIZER_MERGES, ValueType.ARRAY, self.merges, ValueType.STRING))
        recs += [encode_kv(_ID_KEYS[k], ValueType.UINT32, v) for k, v in self.special_ids.items()]
        recs += [encode_kv(_ADD_KEYS[k], ValueType.BOOL, v) for k, v in self.add_special.items()]
        if self.chat_template is not None:
            recs.append(encode_kv(Keys.CHAT_TEMPLATE, ValueType.STRING, self.chat_template))
        return recs


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        return [" ".join(part.replace(" ", _SPACE) for part in pair) for pair in merges]
    return list(merges)


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _add_special_from_post_processor(pp: dict[str, Any] | None) -> dict[str, bool]:
    """Whether bos/eos are added, from the post-processor (a byte-level one adds neither)."""
    out: dict[str, bool] = {}
    for proc in (pp or {}).get("processors", [pp] if pp else []):
        kind = proc.get("type")
        if kind == "ByteLevel":
            out.setdefault("bos", False)
            out.setdefault("eos", False)
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            if len(single) > 1:
                out["bos"] = "SpecialToken" in single[0]
                out["eos"] = "SpecialToken" in single[-1]
    return out


def _chat_template(path: Path, tok_config: dict[str, Any]) -> str | None:
    tmpl = tok_config.get("chat_template")
    if tmpl is None and (path / "chat_template.jinja").is_file():
        tmpl = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif tmpl is None and (path / "chat_template.json").is_file():
        tmpl = read_json(path / "chat_template.json").get("chat_template")
    if isinstance(tmpl, list):  # named templates: keep the default one
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    return tmpl if isinstance(tmpl, str) else None


def read_tokenizer(path: Path, config: dict[str, Any], hparams: dict[str, Any]) -> TokenizerMeta:
    """`config` is the root config.json, `hparams` the merged text settings (for vocab_size)."""
    tj_path = path / "tokenizer.json"
    if not tj_path.is_file():
        raise LemonsliceError(f"{path}: no tokenizer.json (only fast BPE tokenizers are supported)")
    tj = read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise LemonsliceError(f"{tj_path}: not a BPE tokenizer (model type {model.get('type')!r})")
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict)]

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    by_id.update({int(a["id"]): a["content"] for a in added})
    added_special = {a["content"]: bool(a.get("special")) for a in added}
    n_vocab = int(hparams.get("vocab_size") or max(by_id) + 1)
    if max(by_id) >= n_vocab:
        raise LemonsliceError(f"{tj_path}: token id {max(by_id)} is not below the model's vocab_size {n_vocab}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif tok in added_special:
            special = added_special[tok] or _looks_special(tok)
            tokens.append(tok if special else tok.replace("\u2581", " "))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)

    tc_path = path / "tokenizer_config.json"
    tok_config = read_json(tc_path) if tc_path.is_file() else {}
    add_special = _add_special_from_post_processor(tj.get("post_processor"))
    special_ids: dict[str, int] = {}
    content_ids = {a["content"]: int(a["id"]) for a in reversed(added)}  # the first entry wins
    for kind in SPECIAL_KINDS:
        flag = tok_config.get(f"add_{kind}_token")
        if kind in _ADD_KEYS and isinstance(flag, bool):
            add_special.setdefault(kind, flag)
        content = _content(tok_config.get(f"{kind}_token"))
        if content is not None and content in content_ids:
            special_ids[kind] = content_ids[content]
    for kind in SPECIAL_KINDS:
        tid = config.get(f"{kind}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{kind}_token_id")
        if kind not in special_ids and isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab:
            special_ids[kind] = tid
    template = _chat_template(path, tok_config) if tc_path.is_file() else None
    return TokenizerMeta(tokens, types, _merges(model), special_ids, add_special, template)
