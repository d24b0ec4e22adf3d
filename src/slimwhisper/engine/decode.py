"""Greedy and beam decoding over the model's own decoder layers with a static cache.

`DecoderRunner` calls `model.model.decoder`'s embedding, layers and final norm directly (so MHA and
MLA attention run their own code, MLA's absorbed single-token path included) with explicit positions;
a causal mask is built only for the multi-token prefill, since one query with everything before it
visible needs none. Rows that finish leave the batch (the cache drops them), so a batch costs what its
longest unfinished rows cost, not its longest row times the batch.

On a CPU, ordinary (MHA) cross-attention runs the engine's own `cross_attention`: it keeps the encoder
keys transposed, [B, H, h, T], so each step is two plain matmuls that stream the keys and values once;
for one query row per head over 1500 frames that beats SDPA over [B, H, T, h] keys. Ordinary
self-attention runs `self_attention`, with q, k and v projected by one fused linear (int8 with a scale
per row when the model is quantised): at batch 1 a small projection costs mostly per call, not per
weight, so one call instead of three pays. MLA self-attention
steps likewise project [query | latent | kept key dims] with one fused linear (`mla_self_attention`),
then run the module's own absorbed arithmetic (`WhisperMLAAttention.attend_latent`); MLA
cross-attention caches the window's latent once and reads it absorbed at every call, prefill included
(`mla_cross_attention`). MLA self-attention prefill and other devices keep the model's own modules.
Fused weights are copies made when the runner is built: a runner does not follow later changes to the
model's weights. `kv_cache="int8"` gives the runner an int8 cache (engine/cache.py).

The runner calls a layer's per-step linears through `LayerCalls`: for int8 layers these are the
quantised op itself (`quantize.direct_call`), which skips nn.Module's per-call work (a real share of a
small int8 linear's time at batch 1, and tiny.en makes 25 such calls per token), and the cross-attention
keys and values of a window come from one int8 call over the encoder output (`quantize.stack_int8_rows`),
which quantises that input once instead of twice. Both give the modules' results bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention
from ..tokens import TokenIds, decoder_prompt
from .cache import KV_CACHE_KINDS, FixedLayer, StaticEncoderDecoderCache, StaticLayer
from .quantize import direct_call, float_weight_and_bias, is_quantized_linear, quantize_linear_int8, stack_int8_rows
from .rules import LogitRules


@dataclass
class Decoded:
    """One row's result: generated tokens (EOT excluded), sum of their log-probabilities, no-speech prob."""

    tokens: list[int]
    sum_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


class DecoderRunner:
    """One forward of the decoder for new tokens [B, L] given the static cache; returns logits."""

    def __init__(self, model: nn.Module, kv_cache: str = "float"):
        self.model = model
        self.kv_cache = kv_cache
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out
        self.max_positions = model.config.max_target_positions
        self._cache: StaticEncoderDecoderCache | None = None
        on_cpu = next(model.parameters()).device.type == "cpu"
        # exact classes: other subclasses may cache something else
        self.own_cross = [on_cpu and type(layer.encoder_attn) in (WhisperAttention, WhisperMLAAttention)
                          for layer in self.decoder.layers]
        self.fused_qkv = [
            direct_call(fuse_qkv(layer.self_attn)) if own and type(layer.self_attn) is WhisperAttention else None
            for own, layer in zip(self.own_cross, self.decoder.layers)
        ]
        self.fused_mla = [
            fuse_mla(layer.self_attn).direct() if own and type(layer.self_attn) is WhisperMLAAttention else None
            for own, layer in zip(self.own_cross, self.decoder.layers)
        ]
        self.calls = [LayerCalls.of(layer) for layer in self.decoder.layers]
        self.lm_head = direct_call(self.proj_out)
        if kv_cache not in KV_CACHE_KINDS:
            raise SlimWhisperError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        if kv_cache == "int8" and not all(self.own_cross):
            raise SlimWhisperError("the int8 KV cache runs in the engine's own attention, on a CPU; "
                                   "use kv_cache='float' on other devices")

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> StaticEncoderDecoderCache:
        """An empty cache for `batch` rows: the previous call's buffers when they fit (they are kept for reuse)."""
        cache = self._cache
        if cache is None or cache.max_len != max_len or cache.capacity_rows < batch or (
            cache.self_attention_cache.layers[0].dtype != dtype
        ):
            cache = self._cache = StaticEncoderDecoderCache.for_model(self.model, batch, max_len, dtype=dtype,
                                                                      kv_cache=self.kv_cache)
        cache.reset(batch)
        return cache

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, frames, d] for log-mel features [B, mels, 3000]."""
        return self.model.model.encoder(features).last_hidden_state

    def __call__(
        self, tokens: torch.Tensor, cache: StaticEncoderDecoderCache, encoder_out: torch.Tensor,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, V] of the last position, or [B, K, V] of the positions `at` [B, K] (indices into `tokens`).

        Only the positions asked for reach the LM head, the costliest linear (a prompt with previous
        text has up to 224 positions, of which decoding needs two: see `prefill`).
        """
        start = cache.get_seq_length()
        length = tokens.shape[1]
        hidden = self.decoder.embed_tokens(tokens) + self.decoder.embed_positions.weight[start : start + length]
        mask = None
        if length > 1:  # prefill: causal mask over the new positions (the cache is empty or fully visible)
            visible = torch.ones(length, start + length, dtype=torch.bool, device=tokens.device).tril(start)
            mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=tokens.device)
            mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[None, None]
        for idx, layer in enumerate(self.decoder.layers):
            if self.own_cross[idx]:
                fused = self.fused_qkv[idx] if self.fused_qkv[idx] is not None else self.fused_mla[idx]
                hidden = self._layer(idx, layer, fused, hidden, mask, cache, encoder_out)
            else:
                hidden = layer(hidden, attention_mask=mask, encoder_hidden_states=encoder_out, past_key_values=cache)
        if at is None:
            hidden = hidden[:, -1]
        else:
            hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(self.decoder.layer_norm(hidden))

    def _layer(self, idx: int, layer: nn.Module, fused: Callable | FusedMLA | None, hidden, mask,
               cache: StaticEncoderDecoderCache, encoder_out) -> torch.Tensor:
        """A pre-norm Whisper decoder layer (as `WhisperDecoderLayer`, inference) with `cross_attention`,
        and with `self_attention` (MHA) or `mla_self_attention` (MLA, single-token steps) when the layer
        has fused projections."""
        calls = self.calls[idx]
        residual = hidden
        normed = layer.self_attn_layer_norm(hidden)
        attn = layer.self_attn
        if isinstance(fused, FusedMLA) and hidden.shape[1] == 1 and attn.decode_mode == "absorbed":
            out = mla_self_attention(attn, fused, normed, cache.self_attention_cache.layers[idx], calls.self_out)
        elif fused is not None and not isinstance(fused, FusedMLA):  # MHA's fused q|k|v
            out = self_attention(attn, fused, normed, cache.self_attention_cache.layers[idx], mask, calls.self_out)
        else:  # the module itself (MLA prefill or materialised decode, or no fused projections)
            out, _ = attn(normed, past_key_values=cache, attention_mask=mask)
        hidden = residual + out
        cache.is_updated[idx] = True
        cross = cache.cross_attention_cache.layers[idx]
        normed = layer.encoder_attn_layer_norm(hidden)
        if isinstance(layer.encoder_attn, WhisperMLAAttention):
            hidden = hidden + mla_cross_attention(layer.encoder_attn, normed, cross, encoder_out, calls)
        else:
            hidden = hidden + cross_attention(layer.encoder_attn, normed, cross, encoder_out, calls)
        residual = hidden
        hidden = layer.final_layer_norm(hidden)
        hidden = calls.fc2(layer.activation_fn(calls.fc1(hidden)))
        return residual + hidden


@dataclass
class LayerCalls:
    """A decoder layer's per-step linears as the runner calls them: `direct_call`s, so int8 layers run their
    quantised op without nn.Module overhead (same weights, same result)."""

    self_out: Callable[[torch.Tensor], torch.Tensor]
    cross_q: Callable[[torch.Tensor], torch.Tensor]
    cross_out: Callable[[torch.Tensor], torch.Tensor]
    fc1: Callable[[torch.Tensor], torch.Tensor]
    fc2: Callable[[torch.Tensor], torch.Tensor]
    cross_kv: Callable[[torch.Tensor], torch.Tensor] | None = None  # [k | v] of int8 cross-attention, bitwise

    @classmethod
    def of(cls, layer: nn.Module) -> LayerCalls:
        cross = layer.encoder_attn
        kv = stack_int8_rows([cross.k_proj, cross.v_proj]) if type(cross) is WhisperAttention else None
        return cls(direct_call(layer.self_attn.out_proj), direct_call(cross.q_proj), direct_call(cross.out_proj),
                   direct_call(layer.fc1), direct_call(layer.fc2), kv)


def fuse_qkv(attn: WhisperAttention) -> nn.Module:
    """One linear computing [q | k | v] of `attn` (k's missing bias as zeros); int8 per row if `attn`'s are int8."""
    parts = [float_weight_and_bias(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    return _linear_of([w for w, _ in parts], [b for _, b in parts], int8=is_quantized_linear(attn.q_proj))


def _linear_of(weights: list[torch.Tensor], biases: list[torch.Tensor | None], int8: bool) -> nn.Module:
    """One frozen linear stacking `weights`' rows (missing biases as zeros); int8 with a scale per row if asked."""
    weight = torch.cat(weights)
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
    fused = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    fused.requires_grad_(False)
    return quantize_linear_int8(fused) if int8 else fused


def self_attention(
    attn: WhisperAttention, qkv: Callable, hidden: torch.Tensor, layer: StaticLayer, mask: torch.Tensor | None,
    out_proj: Callable | None = None,
) -> torch.Tensor:
    """Whisper decoder self-attention of `hidden` [B, L, d] with `qkv = fuse_qkv(attn)`, caching k, v in `layer`.

    `out_proj` computes attn.out_proj (default: that module)."""
    batch, length, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = qkv(hidden).view(batch, length, 3, heads, head_dim).unbind(2)
    keys, values = layer.update(k.transpose(1, 2), v.transpose(1, 2))
    out = torch.nn.functional.scaled_dot_product_attention(
        (q * attn.scaling).transpose(1, 2), keys, values, attn_mask=mask, scale=1.0
    )
    return (out_proj or attn.out_proj)(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


@dataclass
class FusedMLA:
    """An MLA layer's decode-step projections: [query | latent | kept key dims] of `x` as one linear.

    With `query_folded` the query part has U_k folded in (docs/mla.md, folding); `output`, when set, is out_proj
    with U_v folded in, applied to the mixed latents.
    """

    proj: Callable[[torch.Tensor], torch.Tensor]
    widths: tuple[int, int, int]
    query_folded: bool
    output: Callable[[torch.Tensor], torch.Tensor] | None

    def direct(self) -> FusedMLA:
        """The same projections as `direct_call`s (for the decode loop)."""
        return replace(self, proj=direct_call(self.proj), output=self.output and direct_call(self.output))


def fuse_mla(attn: WhisperMLAAttention, fold: tuple[bool, bool] | None = None) -> FusedMLA:
    """`FusedMLA` for `attn`'s current weights (`WhisperMLAAttention.step_weights`), int8 per row if `attn`'s
    projections are int8.

    `fold` (fold U_k into the query, fold U_v into the output) defaults to the module's own fold plan,
    which never folds int8 layers. Folding is done from dequantised weights, so int8 layers can be told
    to: their folded projections become int8 matmuls in place of two float per-head products, which is
    faster, but quantising the folded weights costs accuracy (BENCHMARKS.md), so it is not the default.
    """
    step = attn.step_weights(float_weight_and_bias, fold)
    proj = _linear_of([w for w, _ in step.parts], [b for _, b in step.parts], int8=is_quantized_linear(attn.q_proj))
    output = None
    if step.output is not None:
        output = _linear_of([step.output[0]], [step.output[1]], int8=is_quantized_linear(attn.out_proj))
    return FusedMLA(proj, step.widths, step.query_folded, output)


def mla_self_attention(attn: WhisperMLAAttention, fused: FusedMLA, hidden: torch.Tensor,
                       layer: StaticLayer, out_proj: Callable | None = None) -> torch.Tensor:
    """One decode step of MLA self-attention of `hidden` [B, 1, d]: one projection, then the absorbed path.

    Caches the step's latent and kept key dims in `layer` as the module would; `out_proj` computes
    attn.out_proj when U_v is not folded (default: that module).
    """
    return attn.decode_step(fused.proj(hidden), fused.widths, layer, query_folded=fused.query_folded,
                            output=fused.output, out_proj=out_proj)


def cross_attention(
    attn: WhisperAttention, hidden: torch.Tensor, layer: FixedLayer, encoder_out: torch.Tensor,
    calls: LayerCalls | None = None,
) -> torch.Tensor:
    """Whisper cross-attention of `hidden` [B, L, d] over the encoder output, keys cached transposed.

    The first call of a window projects the encoder output once and stores keys [B, H, h, T] and
    values [B, H, T, h] in `layer`; every call is then softmax(q K^T) V as two matmuls. `calls`, the
    runner's direct calls of the layer's linears, replace the module's own (same results).
    """
    batch, length, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    if layer.keys is None:
        frames = encoder_out.shape[1]
        keys, values = layer.buffers((batch, heads, head_dim, frames), (batch, heads, frames, head_dim),
                                     encoder_out.dtype, encoder_out.device)
        if calls is not None and calls.cross_kv is not None:  # int8 k and v in one call (one input quantisation)
            new_keys, new_values = calls.cross_kv(encoder_out).view(batch, frames, 2, heads, head_dim).unbind(2)
            transpose_frames_(keys.view(batch, heads * head_dim, frames), new_keys.flatten(2))
            values.copy_(new_values.transpose(1, 2))
        else:
            if type(attn.k_proj) is nn.Linear and attn.k_proj.bias is None:  # W_k x^T is [B, H*h, T]: no transpose
                flat_keys = keys.view(batch, heads * head_dim, frames)
                torch.matmul(attn.k_proj.weight, encoder_out.transpose(1, 2), out=flat_keys)
            else:  # e.g. int8 linears, which only compute x W^T
                transpose_frames_(keys.view(batch, heads * head_dim, frames), attn.k_proj(encoder_out))
            values.copy_(attn.v_proj(encoder_out).view(batch, frames, heads, head_dim).transpose(1, 2))
        layer.keys_transposed = True
        layer.update(keys, values)
    keys, values = layer.read()
    q_proj, out_proj = (attn.q_proj, attn.out_proj) if calls is None else (calls.cross_q, calls.cross_out)
    query = (q_proj(hidden) * attn.scaling).view(batch, length, heads, head_dim).transpose(1, 2)
    probs = (query @ keys).float().softmax(dim=-1).to(query.dtype)  # [B, H, L, T]
    out = (probs @ values).transpose(1, 2).reshape(batch, length, heads * head_dim)
    return out_proj(out)


def mla_cross_attention(
    attn: WhisperMLAAttention, hidden: torch.Tensor, layer: FixedLayer, encoder_out: torch.Tensor,
    calls: LayerCalls | None = None,
) -> torch.Tensor:
    """MLA cross-attention of `hidden` [B, L, d] read straight from the cached latent, for any L.

    The first call of a window projects the encoder output to the latent [B, 1, T, d_c] (and kept key
    dims) once and stores them in `layer`; every call then runs the absorbed arithmetic, which never
    up-projects the 1500-frame cache (cross-attention needs no mask, so the prefill absorbs too).
    """
    if layer.keys is None:
        layer.update(*attn.project_latent(encoder_out))
    latent, kept = layer.read()
    fold_q, fold_o = attn.fold_plan()
    if fold_q or fold_o:  # the module's folded projections (float weights only)
        return attn.absorbed(hidden, latent, kept, None, False)[0]
    q_proj, out_proj = (attn.q_proj, attn.out_proj) if calls is None else (calls.cross_q, calls.cross_out)
    return attn.attend_latent(q_proj(hidden) * attn.scaling, latent, kept, out_proj=out_proj)[0]


def transpose_frames_(dst: torch.Tensor, src: torch.Tensor, block: int = 256) -> None:
    """Write src [B, T, C] transposed into dst [B, C, T], `block` frames at a time.

    One strided copy of a whole window (1500 frames x 384 channels) misses cache on nearly every element;
    block by block the source stays in cache.
    """
    for start in range(0, src.shape[1], block):
        dst[:, :, start : start + block].copy_(src[:, start : start + block].transpose(1, 2))


def prefill(runner: DecoderRunner, prompt: torch.Tensor, cache: StaticEncoderDecoderCache, encoder_out: torch.Tensor,
            ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt [B, P] into an empty cache: logits [B, V] at its last position, and P(<|nospeech|>) [B]
    at each row's SOT (0 for models without that token)."""
    sot_pos = (prompt == ids.sot).long().argmax(dim=1)
    last = torch.full_like(sot_pos, prompt.shape[1] - 1)
    logits = runner(prompt, cache, encoder_out, at=torch.stack([sot_pos, last], dim=1))
    if ids.no_speech is None:
        return logits[:, 1], torch.zeros(prompt.shape[0])
    return logits[:, 1], logits[:, 0].float().softmax(dim=-1)[:, ids.no_speech].cpu()


@torch.inference_mode()
def greedy_decode(
    runner: DecoderRunner,
    encoder_out: torch.Tensor,
    prompt: torch.Tensor,
    ids: TokenIds,
    *,
    timestamps: bool = False,
    temperature: float = 0.0,
    max_length: int | None = None,
    compact_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> list[Decoded]:
    """Greedy (temperature 0) or sampled decoding of a batch that shares one prompt length.

    Args:
        encoder_out: [B, frames, d]; prompt: [B, P] decoder input ids (previous text, SOT, lang, task, ...).
        max_length: total decoder positions, prompt included (default the model's 448).
        compact_fraction: drop finished rows from the batch when at least this share of rows is done.
    """
    batch, plen = prompt.shape
    max_length = min(max_length or runner.max_positions, runner.max_positions)
    vocab = runner.proj_out.out_features
    cache = runner.new_cache(batch, runner.max_positions, encoder_out.dtype)  # one size: buffers are reused
    rules = LogitRules(ids, vocab, batch, timestamps=timestamps, device=prompt.device)
    logits, no_speech = prefill(runner, prompt, cache, encoder_out, ids)
    out = [Decoded([], no_speech_prob=float(no_speech[i]), temperature=temperature) for i in range(batch)]
    active = list(range(batch))  # original row of each current batch row
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    step_tokens: list[torch.Tensor] = []
    step_logprobs: list[torch.Tensor] = []
    step_rows: list[list[int]] = []
    for _ in range(max_length - plen):
        logits = rules.apply(logits.float())
        if temperature > 0:
            probs = (logits / temperature).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        logprob = logits.gather(1, next_tokens[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        next_tokens = torch.where(done, ids.eot, next_tokens)
        step_tokens.append(next_tokens)
        step_logprobs.append(torch.where(done, 0.0, logprob))
        step_rows.append(active)
        rules.advance(next_tokens)
        done = done | (next_tokens == ids.eot)
        n_done = int(done.sum())
        if n_done == len(active):
            break
        if n_done >= max(1, compact_fraction * len(active)):
            keep = (~done).nonzero().squeeze(1)
            cache.select_rows(keep)
            rules.select_rows(keep)
            encoder_out = encoder_out.index_select(0, keep)
            next_tokens, done = next_tokens[keep], done[keep]
            active = [active[i] for i in keep.tolist()]
        logits = runner(next_tokens[:, None], cache, encoder_out)
    _collect(out, step_tokens, step_logprobs, step_rows, ids.eot)
    return out


def _collect(out: list[Decoded], tokens: list, logprobs: list, rows: list, eot: int) -> None:
    """Move the per-step tensors to the CPU once and append each row's tokens up to its EOT."""
    finished = [False] * len(out)
    for tok, lp, active in zip(tokens, logprobs, rows):
        for t, p, r in zip(tok.tolist(), lp.tolist(), active):
            if finished[r]:
                continue
            out[r].sum_logprob += p
            if t == eot:
                finished[r] = True
            else:
                out[r].tokens.append(t)


@torch.inference_mode()
def language_probabilities(runner: DecoderRunner, ids: TokenIds, encoder_out: torch.Tensor
                           ) -> tuple[list[int], list[float]]:
    """Most likely language token per row and its probability: the SOT step's softmax over the language
    tokens, as openai-whisper and transformers detect the language."""
    lang_ids = sorted(ids.lang_to_id.values())
    cache = StaticEncoderDecoderCache.for_model(runner.model, encoder_out.shape[0], 1, dtype=encoder_out.dtype)
    sot = torch.full((encoder_out.shape[0], 1), ids.sot, dtype=torch.long, device=encoder_out.device)
    probs, best = runner(sot, cache, encoder_out)[:, lang_ids].float().softmax(dim=-1).max(dim=-1)
    return [lang_ids[i] for i in best.tolist()], probs.tolist()


def greedy_transcripts(runner: DecoderRunner, encoder_out: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy token sequences, prompt and EOT included, for encoder outputs [B, frames, d]: what the model
    says about audio it is shown (multilingual models detect each row's language first)."""
    ids = TokenIds.from_generation_config(runner.model.generation_config)
    languages = language_probabilities(runner, ids, encoder_out)[0] if ids.multilingual else [None] * len(encoder_out)
    prompts = [decoder_prompt(ids, lang) for lang in languages]
    prompt = torch.tensor(prompts, dtype=torch.long, device=encoder_out.device)
    decoded = greedy_decode(runner, encoder_out, prompt, ids, max_length=prompt.shape[1] + max_new_tokens)
    return [p + d.tokens + [ids.eot] for p, d in zip(prompts, decoded)]
