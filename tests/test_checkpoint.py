"""Checkpoints: sharded loading, and errors that name the broken file or tensor."""
import json
import shutil

import pytest
import torch

from helpers import make_checkpoint
from offload_runtime.weights.checkpoint import Checkpoint, resolve_model_dir
from offload_runtime.model.config import ModelArgs
from offload_runtime import Engine
from offload_runtime.errors import CheckpointError, ConfigError, MissingFileError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("sharded") / "m", "llama-mha", max_shard_size="100KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    return path


def copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_and_generates_like_single_file(sharded, checkpoints, tmp_path):
    ck = Checkpoint(sharded)
    ck.validate()
    assert len({t.file for t in ck.tensors.values()}) >= 3
    single = make_checkpoint(tmp_path / "single", "llama-mha")
    a = Engine.from_pretrained(sharded, dtype="float64", draft=False).generate([4, 5, 6], max_new_tokens=8,
                                                                               temperature=0, ignore_eos=True)
    b = Engine.from_pretrained(single, dtype="float64", draft=False).generate([4, 5, 6], max_new_tokens=8,
                                                                              temperature=0, ignore_eos=True)
    assert a[0].token_ids == b[0].token_ids


def test_tensor_reads_are_exact(sharded):
    from safetensors import safe_open

    ck = Checkpoint(sharded)
    for name, info in list(ck.tensors.items())[:6]:
        with safe_open(str(info.file), "pt") as f:
            assert torch.equal(ck.load(name), f.get_tensor(name))


def test_missing_shard_is_named(sharded, tmp_path):
    path = copy(sharded, tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingFileError, match=victim.name):
        Checkpoint(path)


def test_shard_missing_from_index_is_named(sharded, tmp_path):
    path = copy(sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    del index["weight_map"][name]
    # the tensor is still in its shard but the index forgot it: still found (headers are the truth)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    Checkpoint(path).validate()
    # a tensor the index promises but the shard lacks is named
    index["weight_map"]["model.layers.1.mlp.extra.weight"] = sorted(set(index["weight_map"].values()))[0]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.extra.weight"):
        Checkpoint(path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama-mha")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        Checkpoint(path).validate()


def test_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama-mha")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight \(64, 95\) \(expected \(64, 96\)\)"):
        Checkpoint(path).validate()


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama-mha")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.5.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.5\.mlp\.up_proj\.weight"):
        Checkpoint(path).validate()


@pytest.mark.parametrize("keep_bytes", [4, 100, -200])
def test_truncated_file_is_named(sharded, tmp_path, keep_bytes):
    path = copy(sharded, tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:keep_bytes] if keep_bytes > 0 else data[:keep_bytes])
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(path)


def test_unsupported_dtype_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama-mha")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*I8"):
        Checkpoint(path)


def test_missing_weights_and_config(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama-mha")
    (path / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model.safetensors"):
        Checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json"):
        Checkpoint(path)
    with pytest.raises(MissingFileError, match="not found"):
        resolve_model_dir(tmp_path / "nowhere")


def test_hub_repo_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingFileError, match="huggingface-cli download some-org/some-model"):
        resolve_model_dir("some-org/some-model")


def test_config_parsing():
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, intermediate_size=128)
    with pytest.raises(ConfigError, match="llama, mistral, qwen2"):
        ModelArgs.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="yarn"):
        ModelArgs.from_hf_config({**base, "model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 2}})
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"} | {"model_type": "llama"})
    # transformers-4 style and transformers-5 style spell the same config
    v4 = ModelArgs.from_hf_config({**base, "model_type": "llama", "rope_theta": 5e5, "num_key_value_heads": 2,
                                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}})
    v5 = ModelArgs.from_hf_config({**base, "model_type": "llama", "num_key_value_heads": 2,
                                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.n_kv_heads == 2 and v4.head_dim == 16
    qwen = ModelArgs.from_hf_config({**base, "model_type": "qwen2", "sliding_window": 4096,
                                     "use_sliding_window": False})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    assert ModelArgs.from_name("llama-2-70b").n_params() == pytest.approx(69e9, rel=0.01)
