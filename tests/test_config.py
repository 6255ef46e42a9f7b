"""ModelConfig: built from the published config files, derived sizes as Meta derives them, bad values refused."""

import pytest

from llama3.checkpoint.hf import config_from_hf, config_to_hf
from llama3.checkpoint.meta import config_from_meta, config_to_meta
from llama3.config import PRESETS, ModelConfig, RopeScaling, ffn_hidden_dim, get_preset
from llama3.errors import ConfigError

# The published config.json files (Hugging Face model repos), copied as they are.
LLAMA_3_8B_HF = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
LLAMA_3_1_8B_HF = {
    **LLAMA_3_8B_HF, "max_position_embeddings": 131072, "mlp_bias": False, "eos_token_id": 128001,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA_3_2_1B_HF = {
    **LLAMA_3_1_8B_HF, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_hidden_layers": 16, "tie_word_embeddings": True,
    "rope_scaling": {**LLAMA_3_1_8B_HF["rope_scaling"], "factor": 32.0},
}
# Meta's params.json of Llama 3 8B and 70B.
LLAMA_3_8B_META = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                   "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
LLAMA_3_70B_META = {**LLAMA_3_8B_META, "dim": 8192, "n_layers": 80, "n_heads": 64, "multiple_of": 4096}


@pytest.mark.parametrize("hf, preset", [(LLAMA_3_8B_HF, "llama-3-8b"), (LLAMA_3_1_8B_HF, "llama-3.1-8b"),
                                        (LLAMA_3_2_1B_HF, "llama-3.2-1b")])
def test_published_hf_configs_match_presets(hf, preset):
    assert config_from_hf(hf) == PRESETS[preset]


@pytest.mark.parametrize("params, preset", [(LLAMA_3_8B_META, "llama-3-8b"), (LLAMA_3_70B_META, "llama-3-70b")])
def test_published_meta_params_match_presets(params, preset):
    assert config_from_meta(params) == PRESETS[preset]


def test_meta_use_scaled_rope_means_metas_constants():
    config = config_from_meta({**LLAMA_3_8B_META, "use_scaled_rope": True})
    assert config.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)


@pytest.mark.parametrize("dim, multiple_of, mult, hidden", [
    (4096, 1024, 1.3, 14336), (8192, 4096, 1.3, 28672), (16384, 4096, 1.2, 53248),
    (2048, 256, 1.5, 8192), (3072, 256, 1.0, 8192), (4096, 256, None, 11008)])  # last: Llama 2 7B
def test_ffn_hidden_dim_as_meta_derives_it(dim, multiple_of, mult, hidden):
    assert ffn_hidden_dim(dim, multiple_of, mult) == hidden


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_both_file_formats(name):
    config = PRESETS[name]
    assert config_from_hf(config_to_hf(config)) == config
    assert config_from_meta(config_to_meta(config)).replace(tie_embeddings=config.tie_embeddings) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_preset_shapes():
    assert get_preset("Llama-3.1-405B").n_layers == 126
    assert PRESETS["llama-3.2-3b"].rope_scaling.factor == 32.0
    assert PRESETS["llama-3.1-70b"].rope_scaling.factor == 8.0
    assert PRESETS["llama-3-8b"].rope_scaling is None
    with pytest.raises(ConfigError, match="unknown preset 'llama-4'"):
        get_preset("llama-4")


@pytest.mark.parametrize("change, message", [
    (dict(num_experts=8), "unknown keys ['num_experts']"),
    (dict(model_type="mistral"), "'mistral' model"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(num_key_value_heads=5), "not a multiple of n_kv_heads=5"),
    (dict(hidden_size=4000), "head_dim=125 must be even"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(rms_norm_eps=0.0), "must be positive"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8}), "lacks the key 'low_freq_factor'"),
    (dict(rope_scaling="x"), "rope_scaling must be a JSON object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "big", "low_freq_factor": 1,
                        "high_freq_factor": 4, "original_max_position_embeddings": 8192}), "non-numeric"),
    (dict(rope_theta="x"), "wrong type"),
])
def test_bad_hf_configs(change, message):
    with pytest.raises(ConfigError) as info:
        config_from_hf({**LLAMA_3_8B_HF, **change})
    assert message in str(info.value)


def test_inconsistent_values():
    with pytest.raises(ConfigError, match="dim=100 is not divisible by n_heads=3"):
        ModelConfig(dim=100, n_layers=1, n_heads=3, n_kv_heads=1, vocab_size=10, hidden_dim=8)
    with pytest.raises(ConfigError, match="n_layers=2.5 must be a positive integer"):
        ModelConfig(dim=64, n_layers=2.5, n_heads=4, n_kv_heads=1, vocab_size=10, hidden_dim=8)


def test_bad_meta_params():
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_meta({**LLAMA_3_8B_META, "moe_args": {}})
    with pytest.raises(ConfigError, match="lacks the required key 'n_layers'"):
        config_from_meta({k: v for k, v in LLAMA_3_8B_META.items() if k != "n_layers"})
    with pytest.raises(ConfigError, match="no vocab_size"):
        config_from_meta({**LLAMA_3_8B_META, "vocab_size": -1})
    with pytest.raises(ConfigError, match="unknown config keys"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "dropout": 0.1})
    with pytest.raises(ConfigError, match=r"rope_scaling has unknown keys \['alpha'\]"):
        config_from_meta({**LLAMA_3_8B_META, "rope_scaling": {"factor": 32.0, "alpha": 1}})
    with pytest.raises(ConfigError, match="rope_scaling must be a JSON object"):
        config_from_meta({**LLAMA_3_8B_META, "rope_scaling": [1, 2]})
    with pytest.raises(ConfigError, match="rope_scaling has unknown keys"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "rope_scaling": {"factr": 8.0}})
    with pytest.raises(ConfigError, match="rope_scaling must be a JSON object"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "rope_scaling": 8})
    restored = ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "rope_scaling": {"factor": 32}})
    assert restored.rope_scaling == RopeScaling(factor=32.0)
