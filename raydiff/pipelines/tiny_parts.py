"""Tiny random text encoders and tokenizers built offline, shared by the families' `write_tiny`.

Real architectures with toy sizes (docs/tiny_models.md): they load through the same diffusers /
transformers code as the real checkpoints, so tests exercise the real loading path.
"""

from __future__ import annotations

import string

import torch

_CHARS = list(string.ascii_lowercase + string.digits)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    # Character-level BPE with no merges: every prompt tokenizes, nothing is downloaded.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                         model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def autoencoder_kl(scaling_factor: float):
    """FLUX/SD3's VAE with two levels: 2x spatial downsampling, like the real 8x VAE in miniature."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=scaling_factor, sample_size=32)


def clip_text_model(seed: int, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # eos == pad == 1 matches clip_tokenizer(); the pooled output is taken at the eos position.
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                         vocab_size=1000, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_encoder(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(d_model=d_model, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=32, vocab_size=256, feed_forward_proj="gated-gelu",
                   is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def qwen_tokenizer(special: list[str], words=(), line_start_words=(), chat_template: str | None = None):
    """Byte-level BPE Qwen2Tokenizer: any text tokenizes; `words` become single tokens (with the leading
    space Qwen2's pre-tokenizer glues on), `line_start_words` too (no space). `special[0]` pads, `special[2]`
    ends a turn, as in Qwen's own tokenizers (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({ch: len(special) + i for i, ch in enumerate(bytes_to_unicode().values())})
    merges = []
    # Space-prefixed words first: their merges then win over any inner pair of a line-start word.
    for word in ["Ġ" + w for w in words] + list(line_start_words):
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
            vocab.setdefault(word[:i + 1], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=special[2], pad_token=special[0],
                               extra_special_tokens=special[1:], model_max_length=2048)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to what text-to-image pipelines use: user turns, the assistant prompt,
# and `enable_thinking=False` adding an empty think block (FLUX.2 [klein]); Z-Image passes True.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_tokenizer():
    """A tiny Qwen3 tokenizer with the chat template Z-Image and FLUX.2 [klein] apply to prompts."""
    return qwen_tokenizer(QWEN3_SPECIAL, line_start_words=("user", "assistant"), chat_template=QWEN3_CHAT_TEMPLATE)


def qwen3_text_encoder(seed: int, tokenizer, *, causal_lm: bool = False, hidden: int = 16, layers: int = 2):
    """A tiny Qwen3 (`Qwen3Model`, or `Qwen3ForCausalLM` with `causal_lm`), special ids from `tokenizer`.
    Grouped-query attention (2 heads, 1 kv head) as in the real encoders."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    pad, eos = tokenizer.convert_tokens_to_ids([QWEN3_SPECIAL[0], QWEN3_SPECIAL[2]])
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=2048,
                      bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg)
