"""models/rebuild.py: a compressed model owns its tensors."""
from __future__ import annotations

import numpy as np
import torch

import slimwhisper as sw


def test_converted_model_owns_its_tensors(tiny_model):
    """Training the compressed copy in place must leave the original (the distillation teacher) untouched."""
    for config in (sw.MLAConfig(factorization="joint", latent_rank=4), sw.LowRankConfig(rank=8, granule=8)):
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
        slim = sw.convert(tiny_model, config, calibration=[audio])
        theirs = {t.untyped_storage().data_ptr() for t in tiny_model.state_dict().values()}
        shared = [k for k, t in slim.state_dict().items() if t.untyped_storage().data_ptr() in theirs]
        assert not shared
        with torch.no_grad():
            for p in slim.parameters():
                p.add_(1.0)
        after = tiny_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
