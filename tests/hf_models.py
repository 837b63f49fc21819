"""Tiny random Qwen3.5 checkpoints in Hugging Face layout, for converter tests.

`build_hf_model(spec, outdir)` builds a `Qwen3_5MoeForCausalLM` or `Qwen3_5ForCausalLM`
from its Config class, randomises every parameter (norms included), saves it with
`save_pretrained` and adds a byte-level BPE tokenizer. Variants add hand-made `mtp.*`
tensors in the layout the released checkpoints use (transformers drops them on load),
fuse the experts into `gate_up_proj`/`down_proj`, or nest the weights under
`model.language_model.` as a `...ForConditionalGeneration` checkpoint does.

`hf_model` is a session fixture: `hf_model(spec)` builds each spec once per test run, shared by
the xdist workers.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB_SIZE = 640  # config vocab; the tokenizer has fewer, so the top ids are padding
TOKENIZER_VOCAB = 600
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_ADDED_TOKENS = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen's pre-tokenizer split (as in the released tokenizer.json); a fact, not code.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class HFSpec:
    moe: bool = True
    mtp: bool = False
    fused_experts: bool = False  # experts as one [X, 2F, E] gate_up_proj + [X, E, F] down_proj
    conditional: bool = False  # ...ForConditionalGeneration layout (model.language_model.*)
    seed: int = 0

    @property
    def name(self) -> str:
        parts = ["moe" if self.moe else "dense"]
        parts += [p for p, on in (("mtp", self.mtp), ("fused", self.fused_experts), ("vl", self.conditional)) if on]
        return "-".join(parts) + f"-s{self.seed}"


def text_config_kwargs(moe: bool) -> dict:
    """8 layers (2 full-attention), 2 K heads vs 4 V heads, widths multiples of 256 where possible."""
    kw = dict(
        vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
        max_position_embeddings=4096, rms_norm_eps=1e-6, full_attention_interval=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        tie_word_embeddings=False,
    )
    if moe:
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                  shared_expert_intermediate_size=256)
    else:
        kw.update(intermediate_size=512)
    return kw


def build_hf_model(spec: HFSpec, outdir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    if spec.moe:
        from transformers import Qwen3_5MoeForCausalLM as Model, Qwen3_5MoeTextConfig as Config
    else:
        from transformers import Qwen3_5ForCausalLM as Model, Qwen3_5TextConfig as Config
    cfg = Config(**text_config_kwargs(spec.moe))
    torch.manual_seed(spec.seed)
    model = Model(cfg)
    _randomise(model, spec.seed)
    outdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outdir)
    del model

    st = outdir / "model.safetensors"
    tensors = load_file(st)
    if spec.mtp:
        tensors.update(_mtp_tensors(tensors, spec))
    if spec.fused_experts:
        tensors = _fuse_experts(tensors)
    config = json.loads((outdir / "config.json").read_text())
    # Ids tokenizer_config.json does not set come from here; its eos wins over this one.
    endoftext = _save_tokenizer(outdir)
    config["bos_token_id"] = config["eos_token_id"] = endoftext
    if spec.mtp:
        config["mtp_num_hidden_layers"] = 1
        config["mtp_use_dedicated_embeddings"] = False
    if spec.conditional:
        tensors = {_nest(k): v for k, v in tensors.items()}
        tensors["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4)
        tensors["model.visual.merger.linear_fc1.weight"] = torch.randn(32, 64)
        arch = "Qwen3_5MoeForConditionalGeneration" if spec.moe else "Qwen3_5ForConditionalGeneration"
        text_cfg = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        text_cfg["model_type"] = "qwen3_5_moe_text" if spec.moe else "qwen3_5_text"
        config = {
            "architectures": [arch], "model_type": "qwen3_5_moe" if spec.moe else "qwen3_5",
            "text_config": text_cfg, "vision_config": {"depth": 1, "hidden_size": 64},
            "tie_word_embeddings": False, "image_token_id": 5, "transformers_version": config["transformers_version"],
        }
    save_file(tensors, st, metadata={"format": "pt"})
    (outdir / "config.json").write_text(json.dumps(config, indent=2))
    return outdir


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: (1+w) norms near 0, the gated norm near 1, A_log = log U(1, 16)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def _mtp_tensors(tensors: dict[str, torch.Tensor], spec: HFSpec) -> dict[str, torch.Tensor]:
    """One MTP block (`mtp.layers.0.*`, a full-attention decoder layer) plus fc and its norms."""
    g = torch.Generator().manual_seed(spec.seed + 2)
    full = next(i for i in range(64) if f"model.layers.{i}.self_attn.q_proj.weight" in tensors)
    prefix = f"model.layers.{full}."
    out = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            noise = torch.randn(v.shape, generator=g)
            out["mtp.layers.0." + k[len(prefix):]] = (0.1 * noise if k.endswith("norm.weight") else noise / 16)
    e = tensors["model.norm.weight"].shape[0]
    out["mtp.fc.weight"] = torch.randn(e, 2 * e, generator=g) / 16  # [E, 2E]: embedding half first
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{n}.weight"] = 0.1 * torch.randn(e, generator=g)
    return out


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for k, v in tensors.items():
        head, sep, tail = k.partition(".mlp.experts.")
        if not sep:
            out[k] = v
            continue
        xid, proj, _ = tail.split(".")
        groups.setdefault(head, {}).setdefault(proj, {})[int(xid)] = v
    for head, projs in groups.items():
        stack = {p: torch.stack([d[i] for i in sorted(d)]) for p, d in projs.items()}
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"{head}.mlp.experts.down_proj"] = stack["down_proj"]
    return out


def _nest(name: str) -> str:
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def _save_tokenizer(outdir: Path) -> int:
    """tokenizer.json (byte-level BPE, a ByteLevel post-processor as Qwen's) and tokenizer_config.json;
    returns the id of <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - n_added, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Hello world! Streaming inference, one layer at a time; lemons sliced thin.",
        "def main():\n    return 42  # the answer\n",
        "Qwen3.5 mixes gated delta-net layers with full attention every fourth layer.",
        "数字 123 4567 and emojis 🍋🍋 with a café au lait.",
    ] * 4
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(PLAIN_ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(outdir)
    path = outdir / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return tok.token_to_id(SPECIAL_TOKENS[0])


def cached_hf_model(spec: HFSpec, root: Path) -> Path:
    """`build_hf_model` into `root/<spec.name>` once, under a file lock (parallel workers share `root`)."""
    dest = root / f"hf-{spec.name}"
    if (dest / "config.json").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".hf-{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".hf-{spec.name}-", dir=root))
            build_hf_model(spec, tmp)
            os.rename(tmp, dest)
    return dest


def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary directory every xdist worker of this run sees (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """`hf_model(HFSpec(...))` -> a checkpoint directory, built once per spec and test run."""
    root = shared_tmp(tmp_path_factory)
    return lambda spec=HFSpec(): cached_hf_model(spec, root)
