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
