"""config.json's architecture fields: each in its domain and consistent with the others, checked before a model
is built (ModelArgs.from_hf_config calls `check_config_domains` for HF dirs, GGUF headers and memory estimates).

The integer fields are positive integers by then; here they are bounded by what a model can physically be
(`CONFIG_MAXIMA`, far above any real model), the attention heads must fit the width (kv heads <= heads, heads
dividing hidden_size when there is no head_dim, an even head_dim for rotary embeddings), and the rope and norm
values must be finite and positive. A violation is one ModelLoadError naming the file and the field, with the
value cut to a few dozen characters.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ModelLoadError

CONFIG_MAXIMA = {
    "hidden_size": 1 << 16, "num_hidden_layers": 1024, "intermediate_size": 1 << 20, "num_attention_heads": 1024,
    "vocab_size": 1 << 22, "num_key_value_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 24,
}
"Largest value of each integer config.json field a model can physically have."
ROPE_TYPES = ("default", "llama3", "linear")
"The rope scaling types the model implements (model.rope_inv_freq)."
SCALING_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def not_positive(v: Any) -> bool:
    """True unless `v` is a finite positive number (bools are not numbers here)."""
    return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0


def check_config_domains(c: dict, source: str) -> None:
    """Raise one ModelLoadError (`source`: the field and why) for the first field of the config dict `c` (ModelArgs
    keyword names, integer fields already positive integers) outside its domain or inconsistent with another."""
    for failed, message in _rules(c):
        if failed:
            raise ModelLoadError(f"{source}: {message}")


def _rules(c: dict) -> list[tuple[bool, str]]:
    """(violated, message) for every rule; each condition guards its own operands, so none can raise."""
    heads, kv, hidden, hd = c["num_attention_heads"], c.get("num_key_value_heads"), c["hidden_size"], c.get("head_dim")
    eps, scaling = c.get("rms_norm_eps", 1e-6), c.get("rope_scaling")
    rules = [(c.get(k) is not None and c[k] > most, f"{k}={c.get(k)!r:.40} is larger than any model can be "
              f"(at most {most})") for k, most in CONFIG_MAXIMA.items()]
    rules += [
        (kv is not None and kv > heads, f"num_key_value_heads={kv} is more than num_attention_heads={heads}"),
        (hd is None and hidden % heads > 0, f"num_attention_heads={heads} does not divide hidden_size={hidden}"),
        ((hd or hidden // heads) % 2 == 1, f"head_dim={hd or hidden // heads} is odd; rotary embeddings need it even"),
    ]
    rules += [(k in c and not_positive(c[k]), f"{k}: expected a finite positive number, got {c.get(k)!r:.60}")
              for k in ("rope_theta", "rms_norm_eps")]
    rules += [
        (not not_positive(eps) and eps >= 1, f"rms_norm_eps={eps} is not a small epsilon (expected < 1)"),
        (scaling is not None and not isinstance(scaling, dict), f"rope_scaling: expected an object or null, got "
         f"{scaling!r:.60}"),
    ]
    scaling = scaling if isinstance(scaling, dict) else {}
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    rules.append((rtype not in ROPE_TYPES, f"rope_scaling type {rtype!r:.40} is not supported "
                  f"({', '.join(ROPE_TYPES[1:])}, default)"))
    rules += [(k in scaling and not_positive(scaling[k]), f"rope_scaling.{k}: expected a finite positive number, "
               f"got {scaling.get(k)!r:.60}") for k in SCALING_NUMBERS]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    rules.append((rtype == "llama3" and not not_positive(low) and not not_positive(high) and high <= low,
                  "rope_scaling.high_freq_factor must be larger than low_freq_factor"))
    return rules
