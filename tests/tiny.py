"""Tiny random-weight causal LMs and an offline tokenizer, for fast tests.

``tiny_model_and_tokenizer(family)`` returns ``(model, tokenizer)``: a 4-layer model (d_model 64,
d_ff 128, 4 heads) of the requested Hugging Face architecture, in eval mode with dropout off, and a
byte-level tokenizer (GPT-2 style: one token per UTF-8 byte, spaces marked ``Ġ``; no merges, so any
text round-trips) whose vocabulary is the 256 bytes plus ``<s>``, ``</s>`` and ``<pad>``.

Like the real models, Llama and Mistral tokenizers prepend ``<s>``; the others add no special token.
No tokenizer has a pad token unless ``pad_token=True`` (as with GPT-2 and Llama).

Building a model sets torch to one intra-op thread (``single_thread=False`` leaves it alone): these
models are so small that thread start-up dominates, and on a loaded machine OpenMP threads
spin-waiting for a core made the same tests 10x slower.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "gpt2", "gptj", "gpt_neox", "qwen2", "mistral")
BOS_FAMILIES = frozenset({"llama", "mistral"})

D_MODEL = 64
D_FF = 128
N_LAYERS = 4
N_HEADS = 4
MAX_POSITIONS = 1024

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def tiny_tokenizer(add_bos: bool = False, pad_token: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens (ids 0-255), then ``<s>`` 256, ``</s>`` 257, ``<pad>`` 258."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS, PAD])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD if pad_token else None,
        model_max_length=MAX_POSITIONS,
    )
    tok.padding_side = "right"
    return tok


def tiny_config(family: str, tok, **overrides):
    """The tiny config of ``family`` sized for ``tok``; ``overrides`` set config attributes."""
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        kwargs = dict(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
        if family == "mistral":
            kwargs["sliding_window"] = None
        if family == "qwen2":
            kwargs["use_sliding_window"] = False
    elif family == "gpt2":
        cls = GPT2Config
        kwargs = dict(
            n_embd=D_MODEL,
            n_inner=D_FF,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    elif family == "gptj":
        cls = GPTJConfig
        kwargs = dict(
            n_embd=D_MODEL,
            n_inner=D_FF,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_positions=MAX_POSITIONS,
            rotary_dim=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    elif family == "gpt_neox":
        cls = GPTNeoXConfig
        kwargs = dict(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            rotary_pct=0.25,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_parallel_residual=True,
        )
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config = cls(**common, **kwargs)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


_MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gptj": GPTJForCausalLM,
    "gpt_neox": GPTNeoXForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
}


def tiny_model_and_tokenizer(
    family: str = "llama",
    seed: int = 0,
    *,
    add_bos: bool | None = None,
    pad_token: bool = False,
    single_thread: bool = True,
    **config_overrides,
):
    """A random tiny ``family`` model (float32, CPU, eval mode) and its byte-level tokenizer.

    The weights depend only on ``family``, ``seed`` and the overrides (the global RNG is left alone).
    ``add_bos`` defaults to the family's habit (Llama and Mistral prepend ``<s>``).
    """
    tok = tiny_tokenizer(add_bos=family in BOS_FAMILIES if add_bos is None else add_bos, pad_token=pad_token)
    return _build(family, tok, seed, single_thread, config_overrides), tok


def _build(family: str, tok, seed: int, single_thread: bool, config_overrides: dict):
    """A random-weight model of ``family`` sized for ``tok``, seeded without touching global RNG."""
    if family not in _MODEL_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if single_thread:
        torch.set_num_threads(1)
    config = tiny_config(family, tok, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config)
    model.to(torch.float32)
    model.eval()
    return model


def tiny_model_with_words(
    family: str = "llama",
    words: tuple[str, ...] = (),
    seed: int = 0,
    *,
    head_scale: float = 1.0,
    pad_token: bool = True,
    single_thread: bool = True,
    **config_overrides,
):
    """Like ``tiny_model_and_tokenizer``, with each of ``words`` (e.g. ``" Rome"``) one extra token.

    Edit tests use them as one-token targets: the byte tokenizer splits a word into one token per
    byte, and on a random model only the first of those is within reach of an edit at the subject.
    ``head_scale`` multiplies the LM head so that the model can be confident (a random head with
    std 0.02 caps every probability near 1/vocab). The extra tokens get ids 259, 260, ...
    """
    tok = tiny_tokenizer(add_bos=family in BOS_FAMILIES, pad_token=pad_token)
    if words:
        tok.add_tokens(list(words))
    model = _build(family, tok, seed, single_thread, config_overrides)
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    return model, tok
