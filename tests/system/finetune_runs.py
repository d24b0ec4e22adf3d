"""What the finetune fault tests share: a saved tiny original and its MLA conversion, ready for `finetune`."""
from __future__ import annotations

from pathlib import Path


def save_slim_model(root: Path) -> Path:
    """A tiny original saved under root/orig and its 75% MLA conversion under root/slim (which records the
    original's name and hash, so `finetune` finds its teacher); returns root/slim."""
    import slimwhisper as sw
    from conftest import tiny_pair
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    model.save_pretrained(root / "orig")
    save_processor(processor, root / "orig")
    loaded, processor = sw.load(root / "orig")  # records slimwhisper_source (name, sha256)
    converted = sw.convert(loaded, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    converted.save_pretrained(root / "slim")
    save_processor(processor, root / "slim")
    return root / "slim"
