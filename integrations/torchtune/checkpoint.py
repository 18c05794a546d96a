"""A tiny random-init Qwen2 checkpoint in Hugging Face layout, loadable by torchtune's HF checkpointer.

For tests and the demo: no download, seconds to build. Weights are N(0, 0.02) like HF's
``initializer_range`` (N(0, 1) embeddings give a loss of ~58), norms are ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INIT_STD = 0.02


@dataclass(frozen=True)
class TinyQwen2Config:
    """Shape of the tiny model; field names follow torchtune's ``qwen2`` builder."""

    vocab_size: int = 2048
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    embed_dim: int = 64
    intermediate_dim: int = 128
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    tie_word_embeddings: bool = False


def hf_config(cfg: TinyQwen2Config) -> dict:
    """The ``config.json`` torchtune's ``FullModelHFCheckpointer`` (and ``transformers``) read."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.intermediate_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": 2,
    }


def build_tiny_qwen2_checkpoint(out_dir: str | Path, cfg: TinyQwen2Config | None = None, *, seed: int = 0) -> Path:
    """Write ``model.safetensors`` + ``config.json`` of a random-init Qwen2 into ``out_dir``; return it.

    Load it with ``FullModelHFCheckpointer(checkpoint_dir=out_dir, checkpoint_files=["model.safetensors"],
    model_type="QWEN2")`` and the matching ``torchtune.models.qwen2.qwen2(...)`` builder.
    """
    from safetensors.torch import save_file
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    cfg = cfg or TinyQwen2Config()
    generator = torch.Generator().manual_seed(seed)
    model = qwen2(**{k: v for k, v in asdict(cfg).items()})
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name or "scale" in name:
            state[name] = torch.ones_like(tensor)
        elif name.endswith("bias"):
            state[name] = torch.zeros_like(tensor)
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * INIT_STD
    hf_state = qwen2_tune_to_hf(
        state,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        dim=cfg.embed_dim,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
    return out
