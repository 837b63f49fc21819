"""Qwen3.5 modules (lemonslice.models) against transformers' own Qwen3.5 modules.

Each test builds a transformers module from a tiny random config (2 linear K heads, 6 V
heads, so the V-head order matters), copies its weights into lemonslice's module applying
the GGUF conversion transforms by hand (norm +1, A_log -> -exp(A_log), V heads grouped ->
tiled, experts stacked to ggml order), and compares outputs within 1e-5 relative.
Also: chunked delta rule == recurrent twin, SDPA attention == reference twin, decode
(one token at a time with caches) == prefill.
"""

from __future__ import annotations

import math

import pytest
import torch

from lemonslice.gguf.constants import GGMLType, Keys
from lemonslice.gguf.constants import Tensors as TN
from lemonslice.models import Block, ModelArgs, make_cache
from lemonslice.models.gated_delta import delta_rule_chunked, delta_rule_recurrent, l2_normalize
from lemonslice.models.qwen35_layers import Attention, GatedDeltaNet, MoE, attend, attend_ref
from lemonslice.ops import QuantWeight, as_uint8

import transformers  # noqa: E402,F401
from transformers.models.qwen3_5 import modeling_qwen3_5 as HD  # noqa: E402
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig  # noqa: E402
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as HM  # noqa: E402
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


E, H, HKV, D, G, HV, DK = 64, 4, 2, 32, 2, 6, 16
ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True}
COMMON = dict(
    vocab_size=300, hidden_size=E, num_hidden_layers=4, num_attention_heads=H, num_key_value_heads=HKV,
    head_dim=D, linear_num_key_heads=G, linear_num_value_heads=HV, linear_key_head_dim=DK,
    linear_value_head_dim=DK, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, rope_parameters=ROPE,
)
ATTN_LAYER, DELTA_LAYER = 3, 1  # with full_attention_interval 4


def hf_config(moe: bool):
    if moe:
        cfg = Qwen3_5MoeTextConfig(**COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   num_experts=8, num_experts_per_tok=3)
    else:
        cfg = Qwen3_5TextConfig(**COMMON, intermediate_size=96)
    cfg._attn_implementation = "eager"
    return cfg


def gguf_kv(cfg, moe: bool) -> dict:
    """The metadata llama.cpp's converter writes for `cfg` (written out by hand)."""
    arch = "qwen35moe" if moe else "qwen35"
    k = lambda t: t.format(arch=arch)  # noqa: E731
    kv = {
        Keys.ARCHITECTURE: arch, k(Keys.BLOCK_COUNT): cfg.num_hidden_layers, k(Keys.EMBEDDING_LENGTH): E,
        k(Keys.HEAD_COUNT): H, k(Keys.HEAD_COUNT_KV): HKV, k(Keys.KEY_LENGTH): D, k(Keys.VALUE_LENGTH): D,
        k(Keys.RMS_EPS): 1e-6, k(Keys.ROPE_FREQ_BASE): ROPE["rope_theta"], k(Keys.ROPE_DIMENSION_COUNT): D // 4,
        k(Keys.ROPE_DIMENSION_SECTIONS): [2, 1, 1, 0], k(Keys.SSM_CONV_KERNEL): 4, k(Keys.SSM_STATE_SIZE): DK,
        k(Keys.SSM_GROUP_COUNT): G, k(Keys.SSM_TIME_STEP_RANK): HV, k(Keys.SSM_INNER_SIZE): HV * DK,
        k(Keys.FULL_ATTENTION_INTERVAL): 4,
    }
    if moe:
        kv.update({k(Keys.EXPERT_COUNT): 8, k(Keys.EXPERT_USED_COUNT): 3, k(Keys.EXPERT_FEED_FORWARD_LENGTH): 32,
                   k(Keys.EXPERT_SHARED_FEED_FORWARD_LENGTH): 48})
    else:
        kv[k(Keys.FEED_FORWARD_LENGTH)] = 96
    return kv


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (transformers inits norms to 0 and some weights to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(r * 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.2 * r)
            elif "norm" in name:
                p.copy_(0.2 * r)  # zero-centred: the module multiplies by 1 + w
            elif "conv1d" in name:
                p.copy_(0.4 * r)
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))


# ---- the GGUF transforms, by hand ------------------------------------------------------

def qw(t: torch.Tensor) -> QuantWeight:
    """torch [..., out, in] float -> an F32 QuantWeight with ggml shape (in, out, ...)."""
    t = t.detach().to(torch.float32).contiguous()
    return QuantWeight(as_uint8(t), GGMLType.F32, tuple(reversed(t.shape)))


def tiled(t: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """Reorder V heads along `dim` from grouped (K head g owns heads g*r..g*r+r-1) to tiled (head j*G+g)."""
    t = t.detach().movedim(dim, 0)
    r = HV // G
    t = t.reshape(G, r, head_dim, *t.shape[1:]).transpose(0, 1).reshape(HV * head_dim, *t.shape[1:])
    return t.movedim(0, dim).contiguous()


def deltanet_weights(m, bid: int) -> dict:
    key_dim = G * DK
    qkv = m.in_proj_qkv.weight.detach().clone()
    qkv[2 * key_dim :] = tiled(qkv[2 * key_dim :], 0, DK)
    conv = m.conv1d.weight.detach().squeeze(1).clone()  # [C, K]
    conv[2 * key_dim :] = tiled(conv[2 * key_dim :], 0, DK)
    f = lambda t: t.format(bid=bid)  # noqa: E731
    return {
        f(TN.ATTN_QKV): qw(qkv), f(TN.ATTN_GATE): qw(tiled(m.in_proj_z.weight, 0, DK)),
        f(TN.SSM_BETA): qw(tiled(m.in_proj_b.weight, 0, 1)), f(TN.SSM_ALPHA): qw(tiled(m.in_proj_a.weight, 0, 1)),
        f(TN.SSM_CONV1D): qw(conv), f(TN.SSM_DT): tiled(m.dt_bias, 0, 1),
        f(TN.SSM_A): -torch.exp(tiled(m.A_log, 0, 1)), f(TN.SSM_NORM): m.norm.weight.detach().clone(),
        f(TN.SSM_OUT): qw(tiled(m.out_proj.weight, 1, DK)),
    }


def attention_weights(m, bid: int) -> dict:
    f = lambda t: t.format(bid=bid)  # noqa: E731
    return {
        f(TN.ATTN_Q): qw(m.q_proj.weight), f(TN.ATTN_K): qw(m.k_proj.weight), f(TN.ATTN_V): qw(m.v_proj.weight),
        f(TN.ATTN_OUT): qw(m.o_proj.weight), f(TN.ATTN_Q_NORM): 1 + m.q_norm.weight.detach(),
        f(TN.ATTN_K_NORM): 1 + m.k_norm.weight.detach(),
    }


def moe_weights(m, bid: int) -> dict:
    f = lambda t: t.format(bid=bid)  # noqa: E731
    fe = m.experts.gate_up_proj.shape[1] // 2
    gate_up = m.experts.gate_up_proj.detach()  # [X, 2Fe, E], gate half first
    return {
        f(TN.FFN_GATE_INP): qw(m.gate.weight), f(TN.FFN_GATE_EXPS): qw(gate_up[:, :fe]),
        f(TN.FFN_UP_EXPS): qw(gate_up[:, fe:]), f(TN.FFN_DOWN_EXPS): qw(m.experts.down_proj),
        # HF [1, E] becomes ggml {E, 1}; llama.cpp accepts that for the {E} vector.
        f(TN.FFN_GATE_INP_SHEXP): qw(m.shared_expert_gate.weight),
        f(TN.FFN_GATE_SHEXP): qw(m.shared_expert.gate_proj.weight),
        f(TN.FFN_UP_SHEXP): qw(m.shared_expert.up_proj.weight),
        f(TN.FFN_DOWN_SHEXP): qw(m.shared_expert.down_proj.weight),
    }


def layer_weights(layer, bid: int, moe: bool) -> dict:
    f = lambda t: t.format(bid=bid)  # noqa: E731
    w = {f(TN.ATTN_NORM): 1 + layer.input_layernorm.weight.detach(),
         f(TN.ATTN_POST_NORM): 1 + layer.post_attention_layernorm.weight.detach()}
    w.update(deltanet_weights(layer.linear_attn, bid) if hasattr(layer, "linear_attn")
             else attention_weights(layer.self_attn, bid))
    if moe:
        w.update(moe_weights(layer.mlp, bid))
    else:
        w.update({f(TN.FFN_GATE): qw(layer.mlp.gate_proj.weight), f(TN.FFN_UP): qw(layer.mlp.up_proj.weight),
                  f(TN.FFN_DOWN): qw(layer.mlp.down_proj.weight)})
    return w


# ---- helpers ---------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_rope(cfg, T: int):
    moe = isinstance(cfg, Qwen3_5MoeTextConfig)
    rot = (HM.Qwen3_5MoeTextRotaryEmbedding if moe else HD.Qwen3_5TextRotaryEmbedding)(cfg)
    return rot(torch.zeros(1, T, E), torch.arange(T)[None])


def causal_mask(T: int) -> torch.Tensor:
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


def run_split(module, x: torch.Tensor, cache, cuts: list[int]) -> torch.Tensor:
    """Feed x [T, E] in pieces ending at `cuts` (then the rest one token at a time)."""
    outs, start = [], 0
    for end in [*cuts, *range(cuts[-1] + 1, x.shape[0] + 1)]:
        outs.append(module(x[start:end], cache))
        start = end
    return torch.cat(outs)


T_PROMPT = 70  # more than one 64-token delta-rule chunk


# ---- tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [True, False])
def test_args_from_gguf(moe):
    args = ModelArgs.from_gguf(gguf_kv(hf_config(moe), moe))
    assert args.recurrent == (True, True, True, False)
    assert (args.rope_dim, args.ssm_head_v_dim, args.ssm_conv_dim, args.is_moe) == (8, 16, 2 * 32 + 96, moe)
    kv = gguf_kv(hf_config(moe), moe)
    kv[f"{args.arch}.attention.recurrent_layers"] = [False, True, False, True]
    assert ModelArgs.from_gguf(kv).recurrent == (False, True, False, True)


def test_gated_deltanet_matches_hf():
    cfg = hf_config(True)
    hf = HM.Qwen3_5MoeGatedDeltaNet(cfg, DELTA_LAYER)
    randomize(hf, 1)
    args = ModelArgs.from_gguf(gguf_kv(cfg, True))
    ours = GatedDeltaNet(args, DELTA_LAYER, deltanet_weights(hf, DELTA_LAYER))
    x = torch.randn(1, T_PROMPT, E, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(x)[0]
    assert rel_err(ours(x[0], ours.new_cache()), ref) <= 1e-5
    # Cached decode: a prefill piece, then single tokens, carry conv and recurrent state.
    assert rel_err(run_split(ours, x[0], ours.new_cache(), [5, 66]), ref) <= 1e-5
    rec = ours(x[0], ours.new_cache(), rule=delta_rule_recurrent)
    assert rel_err(rec, ref) <= 1e-5


def test_attention_matches_hf():
    cfg = hf_config(True)
    hf = HM.Qwen3_5MoeAttention(cfg, ATTN_LAYER)
    randomize(hf, 3)
    args = ModelArgs.from_gguf(gguf_kv(cfg, True))
    ours = Attention(args, ATTN_LAYER, attention_weights(hf, ATTN_LAYER))
    T = 40
    x = torch.randn(1, T, E, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(x, hf_rope(cfg, T), causal_mask(T))[0][0]
    assert rel_err(ours(x[0], ours.new_cache()), ref) <= 1e-5
    assert rel_err(ours(x[0], ours.new_cache(), attn=attend_ref), ref) <= 1e-5
    assert rel_err(run_split(ours, x[0], ours.new_cache(), [7, 30]), ref) <= 1e-5


def test_moe_block_matches_hf():
    cfg = hf_config(True)
    hf = HM.Qwen3_5MoeSparseMoeBlock(cfg)
    randomize(hf, 5)
    args = ModelArgs.from_gguf(gguf_kv(cfg, True))
    ours = MoE(args, 0, moe_weights(hf, 0))
    x = torch.randn(1, 24, E, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(x)[0]
    assert rel_err(ours(x[0]), ref) <= 1e-5


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("bid", [DELTA_LAYER, ATTN_LAYER])
def test_decoder_layer_matches_hf(moe, bid):
    cfg = hf_config(moe)
    hf = (HM.Qwen3_5MoeDecoderLayer if moe else HD.Qwen3_5DecoderLayer)(cfg, bid)
    randomize(hf, 10 + bid)
    args = ModelArgs.from_gguf(gguf_kv(cfg, moe))
    block = Block(args, bid, layer_weights(hf, bid, moe))
    assert block.moe == moe and block.role.value == ("recurrent" if bid == DELTA_LAYER else "attention")
    x = torch.randn(1, T_PROMPT, E, generator=torch.Generator().manual_seed(bid))
    with torch.no_grad():
        # The linear-attention path reads the mask as a 2-D padding mask: give it none.
        mask = causal_mask(T_PROMPT) if bid == ATTN_LAYER else None
        ref = hf(x, position_embeddings=hf_rope(cfg, T_PROMPT), attention_mask=mask)[0]
    assert rel_err(block(x[0], make_cache(args, block)), ref) <= 1e-5
    assert rel_err(run_split(block, x[0], make_cache(args, block), [33, 66]), ref) <= 1e-5


def test_block_rejects_tensors_that_disagree_with_metadata():
    cfg = hf_config(False)
    hf = HD.Qwen3_5DecoderLayer(cfg, DELTA_LAYER)
    args = ModelArgs.from_gguf(gguf_kv(cfg, False))
    with pytest.raises(Exception, match="metadata says attention"):
        Block(args, ATTN_LAYER, layer_weights(hf, ATTN_LAYER, False))


def _delta_inputs(T: int, H_: int, dk: int, dv: int, seed: int, decay: float):
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(T, H_, dk, generator=gen), 1e-6) * dk**-0.5
    k = l2_normalize(torch.randn(T, H_, dk, generator=gen), 1e-6)
    v = torch.randn(T, H_, dv, generator=gen)
    g = -torch.rand(T, H_, generator=gen) * decay
    beta = torch.rand(T, H_, generator=gen)
    state = torch.randn(H_, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T,chunk,decay", [(1, 64, 1.0), (37, 16, 0.5), (64, 64, 1.0), (150, 64, 3.0), (200, 32, 40.0)])
def test_chunked_delta_rule_equals_recurrent(T, chunk, decay):
    args = _delta_inputs(T, 3, 16, 8, seed=T, decay=decay)
    o_ref, s_ref = delta_rule_recurrent(*args)
    o, s = delta_rule_chunked(*args, chunk_size=chunk)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


@pytest.mark.parametrize("T,S,pos0", [(1, 9, 8), (5, 5, 0), (4, 11, 7)])
def test_attend_equals_reference(T, S, pos0):
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(T, 4, 8, generator=gen)
    k, v = torch.randn(S, 2, 8, generator=gen), torch.randn(S, 2, 8, generator=gen)
    assert rel_err(attend(q, k, v, pos0), attend_ref(q, k, v, pos0)) <= 1e-5


def test_attend_cut_into_query_blocks_equals_reference():
    # 16 heads over 8192 keys: SDPA runs 64 query rows at a time (32 MiB of scores per call).
    gen = torch.Generator().manual_seed(3)
    T, S = 200, 8192
    q = torch.randn(T, 16, 8, generator=gen)
    k, v = torch.randn(S, 2, 8, generator=gen), torch.randn(S, 2, 8, generator=gen)
    assert rel_err(attend(q, k, v, S - T), attend_ref(q, k, v, S - T)) <= 1e-5
