"""What a finished fine-tuning run leaves behind, read back: the model of `best.safetensors` with
its `best.json`, and the per-epoch table the runner prints."""
from __future__ import annotations

import json
from pathlib import Path

from .model import build_task_model


def load_finetuned(run_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, best.json) of a finished fine-tuning run."""
    import timm
    from safetensors.torch import load_file

    from ..export import timm_kwargs

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "best.json").read_text())
    encoder = timm.create_model(**timm_kwargs(info["encoder"], img_size=info["img_size"]))
    model = build_task_model(info["task"], encoder, info["num_outputs"], frozen=info["mode"] == "linear_probe",
                             decoder_dim=info["seg_decoder_dim"])
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")), strict=True)
    return model.to(device).eval(), info


def format_table(history: list[dict], monitor: str) -> str:
    if not history:
        return "(no epochs)"
    cols = [k for k in history[0] if k not in ("best",)]
    width = {c: max(len(c), 9) for c in cols}

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["  ".join(c.rjust(width[c]) for c in cols) + "  best"]
    for row in history:
        lines.append("  ".join(fmt(row.get(c, "")).rjust(width[c]) for c in cols) + ("  *" if row["best"] else ""))
    return "\n".join(lines)
