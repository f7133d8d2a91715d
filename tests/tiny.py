"""Tiny randomly initialised models and a tiny tokenizer, built offline for the tests."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HIDDEN, NEURONS, LAYERS, VOCAB = 32, 40, 3, 512


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the built-in stimuli (deterministic, < 1 s)."""
    from llm2bids.stimuli import BUILTIN_SETS, heldout_text

    corpus = [heldout_text()] + [
        d.text for name, make in BUILTIN_SETS.items() for d in make().documents
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _llama_like(cls, **extra):
    return cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=NEURONS,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **extra,
    )


CONFIGS = {
    "llama": lambda: _llama_like(transformers.LlamaConfig),
    "qwen2": lambda: _llama_like(transformers.Qwen2Config),
    "mistral": lambda: _llama_like(transformers.MistralConfig),
    "gemma": lambda: _llama_like(transformers.GemmaConfig, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=NEURONS,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_inner=NEURONS,
        n_positions=2048,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=NEURONS,
        max_position_embeddings=2048,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        ffn_dim=NEURONS,
        num_attention_heads=4,
        max_position_embeddings=2048,
        word_embed_proj_dim=HIDDEN,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=NEURONS,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=2048,
    ),
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4
    ),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        ffn_hidden_size=NEURONS,
        new_decoder_architecture=False,
        multi_query=True,
    ),
}


def _generic(model_type: str, **sizes):
    """A tiny config of any transformers model type (sizes under that type's own names)."""
    return lambda: transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2, **sizes
    )


_LLAMA_SIZES = dict(
    hidden_size=HIDDEN,
    intermediate_size=NEURONS,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_GPTJ_SIZES = dict(n_embd=HIDDEN, n_inner=NEURONS, n_layer=LAYERS, n_head=4)

# Registered architectures the hand-written configs above do not cover, then architectures
# llm2bids does not register (found by structure), with where their down projection is: the
# tests hook that module by this path, independently of llm2bids' own discovery.
CONFIGS |= {
    "qwen3": _generic("qwen3", **_LLAMA_SIZES, head_dim=8),
    "gemma2": _generic("gemma2", **_LLAMA_SIZES, head_dim=8),
    "olmo": _generic("olmo", **_LLAMA_SIZES),
    "olmo2": _generic("olmo2", **_LLAMA_SIZES),
    "granite": _generic("granite", **_LLAMA_SIZES),
    "smollm3": _generic("smollm3", **_LLAMA_SIZES),
}
DISCOVERED = {
    "stablelm": (_generic("stablelm", **_LLAMA_SIZES), "model.layers.{}.mlp.down_proj"),
    "starcoder2": (_generic("starcoder2", **_LLAMA_SIZES), "model.layers.{}.mlp.c_proj"),
    "cohere": (_generic("cohere", **_LLAMA_SIZES), "model.layers.{}.mlp.down_proj"),
    "persimmon": (
        _generic("persimmon", **{**_LLAMA_SIZES, "num_key_value_heads": 4}),
        "model.layers.{}.mlp.dense_4h_to_h",
    ),
    "nemotron": (_generic("nemotron", **_LLAMA_SIZES, head_dim=8), "model.layers.{}.mlp.down_proj"),
    "helium": (_generic("helium", **_LLAMA_SIZES, head_dim=8), "model.layers.{}.mlp.down_proj"),
    "exaone4": (_generic("exaone4", **_LLAMA_SIZES), "model.layers.{}.mlp.down_proj"),
    "arcee": (_generic("arcee", **_LLAMA_SIZES), "model.layers.{}.mlp.down_proj"),
    "seed_oss": (_generic("seed_oss", **_LLAMA_SIZES, head_dim=8), "model.layers.{}.mlp.down_proj"),
    "gptj": (_generic("gptj", **_GPTJ_SIZES, rotary_dim=4), "transformer.h.{}.mlp.fc_out"),
    "codegen": (_generic("codegen", **_GPTJ_SIZES, rotary_dim=4), "transformer.h.{}.mlp.fc_out"),
    "gpt_bigcode": (_generic("gpt_bigcode", **_GPTJ_SIZES), "transformer.h.{}.mlp.c_proj"),
    "mpt": (
        _generic("mpt", d_model=HIDDEN, n_layers=LAYERS, n_heads=4, expansion_ratio=2),
        "transformer.blocks.{}.ffn.down_proj",
    ),
    "xglm": (
        _generic("xglm", d_model=HIDDEN, ffn_dim=NEURONS, num_layers=LAYERS, attention_heads=4),
        "model.layers.{}.fc2",
    ),
    "biogpt": (
        _generic(
            "biogpt",
            hidden_size=HIDDEN,
            intermediate_size=NEURONS,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
        ),
        "biogpt.layers.{}.fc2",
    ),
}
CONFIGS |= {arch: config for arch, (config, _) in DISCOVERED.items()}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of architecture ``arch`` (float32, eval mode)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    return model.eval()


def save_tiny(arch: str, folder, seed: int = 0):
    """Save a tiny model and the tiny tokenizer to ``folder`` (loadable by load_model)."""
    model = tiny_model(arch, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def direct_activations(model, token_ids, output=False):
    """Each layer's down-projection input (``output=True``: its output), hooked straight from
    the module on the model's device (independently of llm2bids' hooks), as
    ``(tokens, layers, neurons)`` float32."""
    from llm2bids.models import arch_spec

    spec = arch_spec(model)
    seen = {}
    downs = [spec.down_module(model, layer) for layer in range(len(spec.blocks(model)))]
    if output:
        handles = [
            down.register_forward_hook(
                lambda m, args, out, layer=layer: seen.__setitem__(
                    layer, out.detach().float().cpu()
                )
            )
            for layer, down in enumerate(downs)
        ]
    else:
        handles = [
            down.register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0].detach().float().cpu())
            )
            for layer, down in enumerate(downs)
        ]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model.base_model(
                input_ids=torch.as_tensor(token_ids, device=device)[None], use_cache=False
            )
    finally:
        for h in handles:
            h.remove()
    return np.stack([seen[i].reshape(len(token_ids), -1).numpy() for i in sorted(seen)], axis=1)


@contextlib.contextmanager
def poisoned(lm, layer: int, value: float, token: int = 3, neuron: int = 5):
    """``value`` (NaN or Inf) at one token and neuron of ``layer``'s MLP activations, first
    row of every batch long enough, while the context lasts."""
    from llm2bids.models import arch_spec

    def poison(module, args):
        x = args[0].clone()
        if x.shape[1] > token:
            x[0, token, neuron] = value
        return (x,)

    handle = arch_spec(lm.model).down_module(lm.model, layer).register_forward_pre_hook(poison)
    try:
        yield
    finally:
        handle.remove()
