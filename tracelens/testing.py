"""Tiny random-init models with an in-process tokenizer, for tests and docs (nothing downloads).

`tiny_model("llama")` returns a loaded tracelens model (a raw-mode `TransformerBridge`) together
with an untouched HF copy of the same weights running the same attention implementation, the
independent path every correctness test compares against.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformer_lens.model_bridge import TransformerBridge

from tracelens.errors import ConfigError
from tracelens.model.loading import attention_implementation, load_model

ARCHITECTURES = ("llama", "mistral", "gemma2", "gemma3", "qwen2", "qwen3")
"""The architectures every parity and conformance test runs on (the README's tested list is generated from it)."""

ARCHITECTURE_NAMES = {
    "llama": "Llama", "mistral": "Mistral", "gemma2": "Gemma-2", "gemma3": "Gemma-3 (text)", "qwen2": "Qwen2/Qwen2.5",
    "qwen3": "Qwen3",
}
"""How the README names each tested architecture."""

_CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "I am so happy today! The sun is shining and everything feels wonderful.",
    "I feel sad and tired; nothing seems to go right this week.",
    "Please answer the question politely and formally, with care.",
    "hey what's up, that was totally awesome lol",
    "What is the best way to learn a new language quickly?",
    "You are a helpful assistant. Answer the user's question.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in text too.",
]

# ChatML-style templates; the BOS variant opens every conversation with the tokenizer's BOS token,
# as Llama/Gemma templates do, while the no-BOS variant behaves like Qwen's.
_CHAT_TEMPLATE_BOS = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHAT_TEMPLATE_NO_BOS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _trained_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def make_tokenizer(bos: bool = True, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, built in-process.

    `bos=True`: BOS `<s>` is prepended to plain text and opens the chat template (Llama/Gemma style).
    `bos=False`: no BOS token at all (Qwen style). EOS is `<|im_end|>`, pad `<pad>`.
    """
    from tokenizers import processors

    backend = copy.deepcopy(_trained_bpe(vocab_size))
    if bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if bos else None,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = _CHAT_TEMPLATE_BOS if bos else _CHAT_TEMPLATE_NO_BOS
    tok.init_kwargs["name_or_path"] = "tracelens-tiny-bos" if bos else "tracelens-tiny-nobos"
    return tok


@dataclass
class TinyModel:
    """A tiny loaded model, its untouched HF reference copy and the tokenizer both share."""

    model: TransformerBridge
    reference: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    architecture: str


def tiny_hf_model(
    architecture: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    bos: bool = True,
) -> PreTrainedModel:
    """A random-init eager-attention HF causal LM of the given architecture (eval mode)."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown test architecture {architecture!r}; choose one of {ARCHITECTURES}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        initializer_range=init_std,
        bos_token_id=1 if bos else None,
        eos_token_id=3,
        pad_token_id=4,
        tie_word_embeddings=False,
    )
    head_dim = d_model // n_heads
    config, cls = {
        "llama": lambda: (LlamaConfig(**common), LlamaForCausalLM),
        # A short sliding window makes tests exercise Gemma-2's local-attention layers.
        "gemma2": lambda: (
            Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=8),
            Gemma2ForCausalLM,
        ),
        # Mistral: a sliding window on every layer (64: short enough for tests to cross it, long enough that a
        # 2-layer model still sees a chat prompt's system turn from its response tokens).
        "mistral": lambda: (MistralConfig(**common, sliding_window=64), MistralForCausalLM),
        # Gemma-3: q/k RMS norms, sliding and full layers alternating, separate local RoPE base.
        "gemma3": lambda: (
            Gemma3TextConfig(
                **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=8,
                layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)],
            ),
            Gemma3ForCausalLM,
        ),
        "qwen2": lambda: (Qwen2Config(**common), Qwen2ForCausalLM),
        "qwen3": lambda: (Qwen3Config(**common, head_dim=head_dim), Qwen3ForCausalLM),
    }[architecture]()
    config._attn_implementation = "eager"
    config.architectures = [cls.__name__]  # as a saved config has; TransformerLens picks its adapter by it
    torch.manual_seed(seed)
    return cls(config).to(dtype).eval()


def save_tiny_lora(model: PreTrainedModel, folder: str | os.PathLike, *, rank: int = 4, seed: int = 0) -> Path:
    """Write a random peft LoRA adapter for `model` (untouched) to `folder` and return the folder.

    The adapter has rank `rank` on every attention q/v/o and MLP down projection; its weights are random on
    both factors (`init_lora_weights=False`), so unlike a fresh adapter it changes the model. Needs peft.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(model), config).save_pretrained(folder)
    return Path(folder)


def tiny_model(architecture: str = "llama", *, bos: bool | None = None, attn_implementation: str | None = None,
               **kwargs) -> TinyModel:
    """Load a tiny random model through `tracelens.load_model`, plus an untouched reference copy.

    `bos=None` picks the architecture's family habit: no BOS for Qwen, BOS otherwise.
    `attn_implementation` goes to `load_model` (None: its default); the reference runs the same one.
    Other keyword arguments go to `tiny_hf_model` (n_layers, d_model, n_heads, n_kv_heads, d_mlp, seed,
    init_std, dtype).
    """
    if bos is None:
        bos = not architecture.startswith("qwen")
    hf = tiny_hf_model(architecture, bos=bos, **kwargs)
    reference = copy.deepcopy(hf)
    tokenizer = make_tokenizer(bos=bos, vocab_size=hf.config.vocab_size)
    model = load_model(hf, tokenizer, name=f"tiny-{architecture}", attn_implementation=attn_implementation)
    reference.set_attn_implementation(attention_implementation(model))
    return TinyModel(model=model, reference=reference, tokenizer=tokenizer, architecture=architecture)
