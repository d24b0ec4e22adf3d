"""benchmarks/trimmed_window.py: its encoder forward is the stock one at the full window, and windows round as said."""
from __future__ import annotations

import torch

from conftest import benchmark_script, tiny_whisper

trimmed = benchmark_script("trimmed_window")


def test_the_full_window_reproduces_the_stock_encoder_and_a_trimmed_one_its_first_frames_input():
    model = tiny_whisper().eval()
    encoder = model.get_encoder()
    features = torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    with torch.no_grad():
        stock = encoder(features).last_hidden_state
    full = trimmed.encode_window(encoder, features, model.config.max_source_positions)
    torch.testing.assert_close(full, stock, rtol=1e-5, atol=1e-5)
    short = trimmed.encode_window(encoder, features, 40)
    assert short.shape == (1, 40, model.config.d_model)
    assert not torch.allclose(short, stock[:, :40], atol=1e-3)  # attention over fewer frames changes every state


def test_window_frames_round_up_to_the_granule_and_stop_at_the_full_window():
    assert trimmed.window_frames(5.0, 2.0, 1500) == 352  # 7 s = 350 positions, up to a multiple of 8
    assert trimmed.window_frames(5.0, None, 1500) == 1500
    assert trimmed.window_frames(29.5, 2.0, 1500) == 1500
