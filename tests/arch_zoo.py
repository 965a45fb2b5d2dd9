"""A zoo of tiny randomly initialised HF decoder LMs, one per architecture family: no downloads.

``ARCHITECTURES[name]()`` builds a fresh float32 eval-mode model (seeded, so two builds are
equal) that fits ``tiny_models.make_tokenizer()``: vocab 512, <pad>=0, <s>=1, </s>=2, hidden
size 64, 4 blocks (MoE: 4 experts, top-2), at least 1024 positions, eager attention (exact in
float64 too). ``BLOCK_PATHS[name]`` is where each model keeps its decoder blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from torch import nn

from tiny_models import HIDDEN, NUM_LAYERS, VOCAB

PAD, BOS, EOS = 0, 1, 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
INTERMEDIATE = 128
POSITIONS = 1024
EXPERTS, TOP_K = 4, 2
SLIDING_WINDOW = 16  # shorter than most test texts, so the sliding-window masks really act
SEED = 0

_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
# The Llama-style keyword set most configs accept.
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS,
               **_IDS)


def _build(model_class: str, config_class: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_class)(**kwargs)
        config._attn_implementation = "eager"
        # The default grouped_mm experts kernel has no float64 path (torch._grouped_mm).
        config._experts_implementation = "eager"
        torch.manual_seed(SEED)
        model = getattr(transformers, model_class)(config)
        return model.to(torch.float32).eval()

    build.__qualname__ = build.__name__ = f"build_{model_class}"
    return build


def _llava() -> nn.Module:
    text = transformers.LlamaConfig(**_COMMON)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16,
                                           projection_dim=32)
    # Image token: <unk> (3), which the byte-level tokenizer never produces.
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=3,
                                      vision_feature_layer=-1, **_IDS)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(SEED)
    return transformers.LlavaForConditionalGeneration(config).to(torch.float32).eval()


_MOE = dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
_QWEN_MOE = dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32, decoder_sparse_step=1,
                 norm_topk_prob=True)
_SLIDING = dict(sliding_window=SLIDING_WINDOW)

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "llama": _build("LlamaForCausalLM", "LlamaConfig", **_COMMON),
    "mistral": _build("MistralForCausalLM", "MistralConfig", **_COMMON, **_SLIDING),
    "mixtral": _build("MixtralForCausalLM", "MixtralConfig", **_COMMON, **_MOE),
    "qwen2": _build("Qwen2ForCausalLM", "Qwen2Config", **_COMMON),
    "qwen2_moe": _build("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_COMMON, **_QWEN_MOE,
                        shared_expert_intermediate_size=64),
    "qwen3": _build("Qwen3ForCausalLM", "Qwen3Config", **_COMMON, head_dim=HEAD_DIM),
    "qwen3_moe": _build("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_COMMON, **_QWEN_MOE, head_dim=HEAD_DIM),
    "gemma": _build("GemmaForCausalLM", "GemmaConfig", **_COMMON, head_dim=HEAD_DIM),
    "gemma2": _build("Gemma2ForCausalLM", "Gemma2Config", **_COMMON, **_SLIDING, head_dim=HEAD_DIM,
                     query_pre_attn_scalar=HEAD_DIM),
    "gemma3": _build("Gemma3ForCausalLM", "Gemma3TextConfig", **_COMMON, **_SLIDING, head_dim=HEAD_DIM,
                     query_pre_attn_scalar=HEAD_DIM,
                     layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)),
    "phi": _build("PhiForCausalLM", "PhiConfig", **_COMMON),
    "phi3": _build("Phi3ForCausalLM", "Phi3Config", **_COMMON, original_max_position_embeddings=POSITIONS),
    "gpt2": _build("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=NUM_LAYERS,
                   n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS, **_IDS),
    "gptj": _build("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=NUM_LAYERS,
                   n_head=HEADS, n_inner=INTERMEDIATE, rotary_dim=8, n_positions=POSITIONS, **_IDS),
    "gpt_neox": _build("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                       num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                       max_position_embeddings=POSITIONS, rotary_pct=0.5, **_IDS),
    "opt": _build("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=HEADS, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN,
                  max_position_embeddings=POSITIONS, **_IDS),
    "falcon": _build("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                     num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                     **_IDS),
    "falcon_new_arch": _build("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
                              num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                              new_decoder_architecture=True, max_position_embeddings=POSITIONS, **_IDS),
    "bloom": _build("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=NUM_LAYERS,
                    n_head=HEADS, **_IDS),
    "stablelm": _build("StableLmForCausalLM", "StableLmConfig", **_COMMON),
    "olmo2": _build("Olmo2ForCausalLM", "Olmo2Config", **_COMMON),
    "cohere": _build("CohereForCausalLM", "CohereConfig", **_COMMON),
    "gpt_oss": _build("GptOssForCausalLM", "GptOssConfig", **_COMMON, **_MOE, **_SLIDING, head_dim=HEAD_DIM,
                      # GPT-OSS's YaRN rope, scaled so that 32 x 32 = POSITIONS.
                      rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                       "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                       "original_max_position_embeddings": POSITIONS // 32}),
    "llava": _llava,
}

BLOCK_PATHS: dict[str, str] = {name: "model.layers" for name in ARCHITECTURES}
BLOCK_PATHS.update({
    "gpt2": "transformer.h", "gptj": "transformer.h", "falcon": "transformer.h", "falcon_new_arch": "transformer.h",
    "bloom": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
    "llava": "model.language_model.layers",
})

# Submodule of each block whose output is the MLP / attention output: (mlp, attn).
COMPONENT_NAMES: dict[str, tuple[str, str]] = {name: ("mlp", "self_attn") for name in ARCHITECTURES}
COMPONENT_NAMES.update({
    "gpt2": ("mlp", "attn"), "gptj": ("mlp", "attn"), "gpt_neox": ("mlp", "attention"), "opt": ("fc2", "self_attn"),
    "falcon": ("mlp", "self_attention"), "falcon_new_arch": ("mlp", "self_attention"),
    "bloom": ("mlp", "self_attention"),
})
