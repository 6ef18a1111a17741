"""GGUF files: dequantizing every supported GGML type bit for bit as the gguf package does, models written as
llama.cpp lays them out equal to transformers loading the same file, the q/k row permutation, bytes per sweep,
speculative decoding with a safetensors draft, the file's tokenizer, and bad files."""
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers

from helpers import load_tool, read_jsonl, run_cli, write_jsonl
from test_quant import logits, rel_err
from offload_runtime import Engine
from offload_runtime.errors import CheckpointError, ConfigError, MissingFileError, UsageError
from offload_runtime.model import ggml
from offload_runtime.model.quantization import LINEARS
from offload_runtime.weights import gguf as gguf_source
from offload_runtime.weights.gguf import GGUFSource
from offload_runtime.weights.layout import layer_layout

gw = load_tool("gguf_write")

IDS = [1, 17, 44, 9, 81, 5, 60, 22, 7]
# K-quants need input widths of whole 256-weight super-blocks: hidden 256, MLP 512.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, initializer_range=0.15,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Every block type somewhere in one model: (layer, linear) -> type.
ALL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32")


def mixed(i: int, linear: str) -> str:
    return ALL_TYPES[(7 * i + LINEARS.index(linear)) % len(ALL_TYPES)]


def hf_model(arch: str, seed: int = 0, **overrides):
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch](**{**SHAPE, **overrides})
    torch.manual_seed(seed)
    return {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch](cfg).eval()


def write(model, path, types, **kw):
    return gw.write_gguf(model.config, model.state_dict(), path, types, **kw)


def reference(path, dtype=torch.float64):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


# --- dequantizing, per type


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantize_equals_the_gguf_package_bit_for_bit(type_name):
    """Blocks quantized by the gguf package (where it can) and random blocks (every bit pattern, NaN and inf
    scales included) dequantize to the same float32 bits as gguf.quants.dequantize (NaNs to NaNs: numpy and
    torch widen a half NaN's payload differently)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    kind = ggml.SUPPORTED_TYPES[int(qtype)]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 1024
    cases = [rng.integers(0, 256, (rows, cols // block * nbytes), dtype=np.uint8)]
    if not type_name.endswith("_K"):
        w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 4, (rows, 1))).astype(np.float32)
        cases.append(np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1))
    for raw in cases:
        with np.errstate(all="ignore"):
            expected = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        # reuse=True (ggml_linear's form, in this thread's scratch buffers) twice: a second call into the same
        # buffers gives the same bits
        for reuse in (False, True, True):
            ours = ggml.dequantize(torch.from_numpy(raw.copy()), kind, reuse=reuse).numpy()
            assert ours.shape == (rows, cols)
            nan = np.isnan(expected)
            assert np.array_equal(np.isnan(ours), nan), type_name
            assert np.array_equal(ours[~nan].view(np.uint32), expected[~nan].view(np.uint32)), type_name


def test_dequantize_in_chunks_and_into_other_dtypes(monkeypatch):
    raw = gw.random_blocks("Q6_K", 9, 512, seed=3)
    whole = ggml.dequantize(torch.from_numpy(raw), ggml.BY_NAME["Q6_K"])
    monkeypatch.setattr(ggml, "DEQUANT_CHUNK", 1000)  # rows one at a time
    assert torch.equal(ggml.dequantize(torch.from_numpy(raw), ggml.BY_NAME["Q6_K"]), whole)
    half = ggml.dequantize(torch.from_numpy(raw), ggml.BY_NAME["Q6_K"], torch.bfloat16)
    assert torch.equal(half, whole.to(torch.bfloat16))
    # a BF16 linear computed in bfloat16 (ggml_linear's reuse form) is the file's own bytes, not a copy
    floats = torch.from_numpy(raw[:, :400].copy())  # 9 x 200 bf16 values
    as_is = ggml.dequantize(floats, ggml.BY_NAME["BF16"], torch.bfloat16, reuse=True)
    assert as_is.data_ptr() == floats.data_ptr() and as_is.dtype == torch.bfloat16 and as_is.shape == (9, 200)
    widened = ggml.dequantize(floats, ggml.BY_NAME["BF16"], torch.float32, reuse=True)  # random bits: NaNs too
    assert torch.equal(widened.view(torch.int32), floats.view(torch.bfloat16).float().view(torch.int32))


# --- models


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    models = {"llama": hf_model("llama"), "qwen2": hf_model("qwen2", seed=1)}
    out = {}
    for arch, types in (("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_K_M"), ("llama", "mixed"),
                        ("qwen2", "F32"), ("qwen2", "mixed")):
        pick = {"Q4_K_M": gw.q4_k_m_types(2), "mixed": mixed}.get(types, types)
        d = root / f"{arch}-{types}"
        d.mkdir()
        out[arch, types] = write(models[arch], d / "model.gguf", pick, embed_type="Q8_0" if types == "mixed" else "F32")
    return models, out


@pytest.mark.parametrize("arch,types", [("llama", "Q8_0"), ("llama", "Q4_K_M"), ("llama", "mixed"),
                                        ("qwen2", "mixed")])
def test_logits_and_greedy_tokens_equal_transformers_loading_the_file(files, arch, types):
    _, paths = files
    path = paths[arch, types]
    ref = reference(path)
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    assert expected.abs().max() > 0.1
    engine = Engine.from_pretrained(path, dtype="float64", draft=False)
    assert engine.target.args.ggml_types is not None
    assert rel_err(logits(engine, IDS), expected) < 1e-12
    engine32 = Engine.from_pretrained(path, dtype="float32", draft=False)
    assert rel_err(logits(engine32, IDS), expected) < 1e-4
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(torch.tensor([IDS]), max_new_tokens=12, do_sample=False)[0, len(IDS):].tolist()
    assert engine.generate(IDS, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids == want


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_float32_file_is_the_original_model(files, arch):
    """llama.cpp's q/k permutation undone: an F32 file runs exactly the transformers model it was written from."""
    models, paths = files
    with torch.no_grad():
        expected = models[arch].double()(torch.tensor([IDS])).logits[0]
        models[arch].float()
    engine = Engine.from_pretrained(paths[arch, "F32"], dtype="float64", draft=False)
    assert rel_err(logits(engine, IDS), expected) < 1e-12


def test_llama3_rope_scaling_is_read_from_the_files_rope_factors(tmp_path, monkeypatch):
    """Llama 3.1+ files carry their RoPE scaling as llama.cpp's per-frequency factors (rope_freqs.weight): the file
    runs the original model (transformers' GGUF loader ignores them, so the original is the reference here)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    model = hf_model("llama", seed=4, rope_parameters=rope, max_position_embeddings=131072)
    path = write(model, tmp_path / "l3.gguf", "F32")
    with torch.no_grad():
        expected = model.double()(torch.tensor([IDS])).logits[0]
    engine = Engine.from_pretrained(path, dtype="float64", draft=False, max_seq_len=64)
    assert engine.target.args.rope_scaling["factor"] == 8.0
    assert rel_err(logits(engine, IDS), expected) < 1e-12
    # Without the scaling (as if rope_freqs were ignored) the model is another one.
    monkeypatch.setattr(gguf_source, "LLAMA3_SCALINGS", ({**gguf_source.LLAMA3_SCALINGS[0], "factor": 1.0},))
    with pytest.raises(ConfigError, match="match no llama3 scaling"):
        Engine.from_pretrained(path, dtype="float64", draft=False)
    monkeypatch.undo()
    plain = gguf_source.GGUFSource(path)
    monkeypatch.setattr(gguf_source.GGUFSource, "_llama3_scaling", lambda self, args: None)
    unscaled = Engine.from_pretrained(path, dtype="float64", draft=False, max_seq_len=64)
    assert plain.args.rope_scaling is not None and unscaled.target.args.rope_scaling is None
    assert rel_err(logits(unscaled, IDS), expected) > 1e-6


@pytest.mark.parametrize("types", ["F32", "Q4_K_M"])
def test_without_the_row_permutation_undone_the_model_is_wrong(files, monkeypatch, types):
    _, paths = files
    right = logits(Engine.from_pretrained(paths["llama", types], dtype="float64", draft=False), IDS)
    monkeypatch.setattr(gguf_source, "PERMUTED_ARCHITECTURES", ())
    wrong = logits(Engine.from_pretrained(paths["llama", types], dtype="float64", draft=False), IDS)
    assert rel_err(wrong, right) > 1e-3


def test_streamed_layers_move_the_files_bytes_and_equal_resident(files):
    _, paths = files
    path = paths["llama", "Q4_K_M"]
    src = GGUFSource(path)
    # Q4_K_M: layer 1 keeps attn_v and ffn_down in Q6_K, layer 0 in Q4_K: two layouts
    assert src.args.ggml_types[0] != src.args.ggml_types[1]
    for i in range(2):
        layout = layer_layout(src.args, torch.float32, None, i)
        for linear in LINEARS:
            t = src.tensors[f"model.layers.{i}.{linear}.weight"]
            assert layout.slots[ggml.ggml_name(linear, t.kind.name)].nbytes == t.nbytes
    base = Engine.from_pretrained(path, dtype="float32", draft=False, offload=False)
    for slots in (1, 2):
        streamed = Engine.from_pretrained(path, dtype="float32", draft=False, offload=True, resident_layers=0,
                                          slots=slots)
        layers = streamed.target.layers
        assert layers.bytes_per_sweep == sum(layer_layout(src.args, torch.float32, None, i).nbytes
                                             for i in range(2))
        file_layer_bytes = sum(t.nbytes for n, t in src.tensors.items() if n.startswith("model.layers."))
        assert file_layer_bytes <= layers.bytes_per_sweep < file_layer_bytes + 2 * len(LINEARS) * 2 * 256 + 8192
        assert torch.equal(logits(streamed, IDS), logits(base, IDS))
        assert layers.history[-1].bytes == layers.bytes_per_sweep
        a = base.generate(IDS, max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids
        assert streamed.generate(IDS, max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids == a


@pytest.fixture(scope="module")
def draft(files, tmp_path_factory):
    """A safetensors draft of the llama files: the target's float weights cut to one layer, with the file's own
    tokenizer (the same vocabulary)."""
    models, paths = files
    path = paths["llama", "Q8_0"]
    out = tmp_path_factory.mktemp("gguf_draft") / "draft"
    small = hf_model("llama", num_hidden_layers=1)
    small.load_state_dict({k: v for k, v in models["llama"].state_dict().items()
                           if not k.startswith("model.layers.1.")})
    small.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out


def test_gguf_target_with_a_safetensors_draft_decodes_exactly(files, draft):
    _, paths = files
    path = paths["llama", "Q8_0"]
    plain = Engine.from_pretrained(path, dtype="float64", draft=False)
    spec = Engine.from_pretrained(path, dtype="float64", draft=str(draft), tree=[-1, 0, 0, 1, 1, 2, 3], plan=None)
    a = plain.generate(IDS, max_new_tokens=30, temperature=0, ignore_eos=True)[0]
    b = spec.generate(IDS, max_new_tokens=30, temperature=0, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids
    assert b.stats.steps < 30  # the draft's tokens are accepted


def test_the_commands_take_a_gguf_model(files, draft, tmp_path):
    from planner.models import resolve_model

    _, paths = files
    path = paths["llama", "Q4_K_M"]
    home = {"OFFLOAD_RUNTIME_HOME": str(tmp_path / "home")}
    proc = run_cli("offload_runtime.chat", "--model", path, "--draft", draft, "--device", "cpu", "--temperature", "0",
                   "--max-new-tokens", "5", "--plan", "none", stdin="the tea\n/quit\n", env=home)
    assert proc.returncode == 0, proc.stderr
    assert "[5 tokens" in proc.stderr + proc.stdout
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the sea"}])
    proc = run_cli("offload_runtime.batch", "--model", path, "--no-draft", "--input", inp, "--output",
                   tmp_path / "out.jsonl", "--device", "cpu", "--max-new-tokens", "4", "--temperature", "0", env=home)
    assert proc.returncode == 0, proc.stderr
    want = Engine.from_pretrained(path, device="cpu", draft=False).generate("the sea", max_new_tokens=4,
                                                                               temperature=0, ignore_eos=True)[0]
    assert read_jsonl(tmp_path / "out.jsonl")[0]["text"] == want.text
    ref, args, notice = resolve_model(str(path))  # the planner's view: the file's shape and packed types
    assert notice is None and ref.path == str(path) and args.ggml_types == GGUFSource(path).args.ggml_types


def test_tokenizer_and_chat_template_come_from_the_file(files, tmp_path):
    models, paths = files
    path = paths["llama", "Q8_0"]
    engine = Engine.from_pretrained(path, dtype="float32", draft=False)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the tea is at the sea, eh"
    assert engine.tokenizer.encode(text) == ref.encode(text) and len(ref.encode(text)) > 3
    assert engine.tokenizer.chat_template == gw.CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi there"}]
    assert engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|user|>hi there<|end|><|assistant|>"
    out = engine.generate(text, max_new_tokens=4, temperature=0, ignore_eos=True)[0]
    assert out.prompt_token_ids == ref.encode(text)
    bare = write(models["llama"], tmp_path / "bare.gguf", "Q8_0", tokenizer=False)
    assert Engine.from_pretrained(bare, dtype="float32", draft=False).tokenizer is None


def test_a_directory_and_a_split_file_load_the_same_model(files, tmp_path):
    models, paths = files
    one = paths["llama", "Q8_0"]
    want = logits(Engine.from_pretrained(one, dtype="float64", draft=False), IDS)
    assert torch.equal(logits(Engine.from_pretrained(one.parent, dtype="float64", draft=False), IDS), want)
    split = tmp_path / "split"
    split.mkdir()
    write(models["llama"], split / "m.gguf", "Q8_0", split_max_tensors=8)
    parts = sorted(split.glob("*.gguf"))
    assert len(parts) >= 3 and parts[0].name == f"m-00001-of-{len(parts):05d}.gguf"
    assert torch.equal(logits(Engine.from_pretrained(parts[0], dtype="float64", draft=False), IDS), want)
    assert torch.equal(logits(Engine.from_pretrained(split, dtype="float64", draft=False), IDS), want)
    parts[1].unlink()
    with pytest.raises(MissingFileError, match=parts[1].name):
        Engine.from_pretrained(parts[0], draft=False)


# --- bad files


def test_a_truncated_file_is_named(files, tmp_path):
    _, paths = files
    src = paths["llama", "Q8_0"]
    data = src.read_bytes()
    for keep in (len(data) - 1000, 40):  # inside the last tensor; inside the header
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="truncated"):
            Engine.from_pretrained(bad, draft=False)


def test_a_missing_tensor_is_named(files, tmp_path):
    models, _ = files
    bad = write(models["llama"], tmp_path / "missing.gguf", "Q8_0", skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\) blk\.1\.ffn_up\.weight"):
        Engine.from_pretrained(bad, draft=False)


def test_an_unsupported_architecture_is_named(files, tmp_path):
    models, _ = files
    bad = write(models["llama"], tmp_path / "gemma.gguf", "Q8_0", arch="gemma")
    with pytest.raises(ConfigError, match="'gemma' model; the runtime runs GGUF architectures llama, qwen2"):
        Engine.from_pretrained(bad, draft=False)


def test_an_unsupported_type_names_tensor_type_and_supported_types(files, tmp_path):
    models, _ = files
    sd = dict(models["llama"].state_dict())
    bad = tmp_path / "q2k.gguf"
    gw.write_gguf(models["llama"].config, sd, bad, lambda i, linear: "Q2_K" if (i, linear) == (1, "mlp.up_proj")
                  else "Q8_0", random=True)
    with pytest.raises(CheckpointError) as e:
        Engine.from_pretrained(bad, draft=False)
    assert "blk.1.ffn_up.weight" in str(e.value) and "Q2_K" in str(e.value)
    assert ggml.supported_names() in str(e.value) and "\n" not in str(e.value)


def test_quantize_options_and_the_disk_store_are_refused_for_gguf(files, tmp_path):
    _, paths = files
    path = paths["llama", "Q8_0"]
    with pytest.raises(UsageError, match="GGUF file, already quantized"):
        Engine.from_pretrained(path, draft=False, quantize="int4")
    with pytest.raises(UsageError, match="disk store"):
        Engine.from_pretrained(path, draft=False, offload=True, resident_layers=0, offload_dir=tmp_path / "s")
    for spec in ("self", "self-int4", "self-int8"):
        with pytest.raises(UsageError, match=f"--draft {spec} is not supported for a GGUF file"):
            Engine.from_pretrained(path, draft=spec)


def test_a_later_part_of_a_split_file_points_at_the_first(files, tmp_path):
    _, paths = files
    part = tmp_path / "m-00002-of-00002.gguf"
    shutil.copy(paths["llama", "Q8_0"], part)
    with pytest.raises(CheckpointError, match="m-00001-of-00002.gguf"):
        Engine.from_pretrained(part, draft=False)
    # A directory holding only the later parts names the missing first one.
    with pytest.raises(MissingFileError, match=r"holds m-00002-of-00002.gguf but not their first part "
                                               r"m-00001-of-00002.gguf; download every part"):
        Engine.from_pretrained(tmp_path, draft=False)


# --- host memory


def test_loading_holds_the_files_bytes_once_and_no_dequantized_copy(tmp_path):
    """Peak RSS growth of a streamed load (fresh process, VmHWM) stays within the host store (the file's layer
    bytes) plus the two device slots (host RAM on the CPU), plus a margin of half the file (55 MB: machines differ
    by 10-20 MB). Holding the file twice, or a float16 copy of the layers, adds at least 0.88 of the file (96 MB)."""
    import json
    import subprocess
    import sys
    import textwrap

    cfg = transformers.LlamaConfig(**{**SHAPE, "hidden_size": 1024, "intermediate_size": 2816,
                                      "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                                      "vocab_size": 512})
    shapes = {**{f"model.layers.{i}.{n}": s for i in range(8) for n, s in
                 {"input_layernorm.weight": (1024,), "post_attention_layernorm.weight": (1024,),
                  **{f"{lin}.weight": s for lin, s in (("self_attn.q_proj", (1024, 1024)),
                                                       ("self_attn.k_proj", (1024, 1024)),
                                                       ("self_attn.v_proj", (1024, 1024)),
                                                       ("self_attn.o_proj", (1024, 1024)),
                                                       ("mlp.gate_proj", (2816, 1024)), ("mlp.up_proj", (2816, 1024)),
                                                       ("mlp.down_proj", (1024, 2816)))}}.items()},
              "model.embed_tokens.weight": (512, 1024), "model.norm.weight": (1024,), "lm_head.weight": (512, 1024)}
    sd = {n: torch.zeros(s) if len(s) == 1 or n.startswith(("model.embed", "lm_head")) else torch.empty(s)
          for n, s in shapes.items()}
    path = gw.write_gguf(cfg, sd, tmp_path / "big.gguf", "Q8_0", random=True, tokenizer=False, embed_type="F16")
    src = GGUFSource(path)
    file_layers = sum(t.nbytes for n, t in src.tensors.items() if n.startswith("model.layers."))
    slots = 2 * layer_layout(src.args, torch.float16, None, 0).nbytes
    assert file_layers > 100e6
    script = textwrap.dedent(f"""
        import json, psutil
        from offload_runtime import Engine
        from offload_runtime.weights.gguf import GGUFSource
        GGUFSource({str(path)!r})  # warm imports outside the measurement
        before = psutil.Process().memory_info().rss
        engine = Engine.from_pretrained({str(path)!r}, dtype="float16", draft=False, offload=True,
                                        resident_layers=0, max_seq_len=16, progress=False)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(json.dumps({{"before": before, "peak": int(hwm.split()[1]) * 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["before"]
    # Measured here: 12 MB above store + slots; holding the file twice: 135 MB above.
    assert grown < file_layers + slots + file_layers / 2, (grown, file_layers, slots)


def test_bench_quant_gguf_rows(tmp_path):
    bench = load_tool("bench_quant")
    rows, note = bench.gguf_rows("tiny", bench.QUICK, tmp_path, threads=1, repeats=1, new_tokens=3,
                                 with_llama_cpp=False)
    by = {r["format"]: r for r in rows}
    assert set(by) == {"bf16", "GGUF Q8_0, bfloat16", "GGUF Q8_0, float32", "GGUF Q4_K_M-like, bfloat16",
                       "GGUF Q4_K_M-like, float32"} and note == ""
    # Q8_0 is 8.5 bits a weight, the Q4_K_M-like mix (4.5-6.6 bits) less; norms stay in the compute dtype.
    assert 0.5 < by["GGUF Q8_0, float32"]["bytes_vs_bf16"] < 0.56
    assert 0.25 < by["GGUF Q4_K_M-like, float32"]["bytes_vs_bf16"] < by["GGUF Q8_0, float32"]["bytes_vs_bf16"]
    assert all(v["tokens_per_s"] > 0 for v in by.values())
