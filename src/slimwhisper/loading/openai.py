"""Export a Hugging Face Whisper model as an openai-whisper checkpoint.

openai-whisper is the reference implementation; running it on exactly our weights is how the
loader is checked token for token. `whisper.load_model(path)` reads the file written here offline.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SlimWhisperError

if TYPE_CHECKING:
    import torch
    from transformers import WhisperForConditionalGeneration

# Applied in order to each Hugging Face key; the layer-norm names go before the attention names
# because "self_attn_layer_norm" contains "self_attn".
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.", ""),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"\.embed_positions\.weight$", ".positional_embedding"),
    (r"\.embed_tokens\.", ".token_embedding."),
)
_DROPPED = {"proj_out.weight"}  # tied to the token embedding; openai-whisper reuses that matrix
_HF_ONLY = re.compile(r"layers|_proj|self_attn|encoder_attn|fc[12]|layer_norm|embed_")


def openai_key(hf_key: str) -> str:
    """The openai-whisper name of one Hugging Face Whisper parameter."""
    key = hf_key
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    if _HF_ONLY.search(key):
        raise SlimWhisperError(
            f"cannot export {hf_key} to openai-whisper (became {key}); only plain Whisper models "
            "(no compressed layers) have an openai-whisper equivalent"
        )
    return key


def openai_dims(model: WhisperForConditionalGeneration) -> dict[str, int]:
    """openai-whisper's `ModelDimensions` fields (its MLP width is fixed at 4 * d_model)."""
    c = model.config
    if not c.encoder_ffn_dim == c.decoder_ffn_dim == 4 * c.d_model:
        raise SlimWhisperError(
            f"openai-whisper needs MLP width 4 * d_model = {4 * c.d_model}, but this model has "
            f"{c.encoder_ffn_dim} (encoder) and {c.decoder_ffn_dim} (decoder)"
        )
    return {
        "n_mels": c.num_mel_bins,
        "n_audio_ctx": c.max_source_positions,
        "n_audio_state": c.d_model,
        "n_audio_head": c.encoder_attention_heads,
        "n_audio_layer": c.encoder_layers,
        "n_vocab": c.vocab_size,
        "n_text_ctx": c.max_target_positions,
        "n_text_state": c.d_model,
        "n_text_head": c.decoder_attention_heads,
        "n_text_layer": c.decoder_layers,
    }


def openai_state_dict(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The weights under openai-whisper names, as fp32 CPU tensors."""
    import torch

    return {
        openai_key(k): v.detach().to("cpu", torch.float32).clone()
        for k, v in model.state_dict().items()
        if k not in _DROPPED
    }


def to_openai_whisper_checkpoint(
    model: WhisperForConditionalGeneration, path: str | os.PathLike[str]
) -> Path:
    """Save `model` as `{'dims': ..., 'model_state_dict': ...}` for `whisper.load_model(path)`.

    Args:
        model: a plain Hugging Face Whisper model (e.g. from `slimwhisper.loading.load`).
        path: the `.pt` file to write; parent directories are created.

    Returns:
        The path written.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": openai_dims(model), "model_state_dict": openai_state_dict(model)}, path)
    return path
