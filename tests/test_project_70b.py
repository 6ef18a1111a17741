"""The 70B projection tool: its arithmetic follows the time model it states."""
from helpers import load_tool

project_70b = load_tool("project_70b")


def test_projection_is_stream_bound_and_speculation_divides_it():
    r = project_70b.project(bandwidth_gbps=25.0, memory_gib=22.0, tflops=80.0, mem_gbps=900.0,
                            p=[0.8, 0.1, 0.05])
    # 79-80 streamed layers of 1.71 GB at 25 GB/s: about 5.4 s, which plain decoding pays per token
    assert 5.0 < r["stream_s"] < 5.6 and abs(r["plain_s_per_token"] - r["stream_s"]) < 0.1
    assert r["n"] > 100 and r["tokens_per_step"] > 4
    assert r["s_per_token"] < r["plain_s_per_token"] / 4
    faster = project_70b.project(bandwidth_gbps=50.0, memory_gib=22.0, tflops=80.0, mem_gbps=900.0,
                                 p=[0.8, 0.1, 0.05])
    assert faster["stream_s"] < r["stream_s"] * 0.55


def test_self_draft_rows_count_the_low_bit_copy_and_refuse_what_does_not_fit():
    import pytest

    from offload_runtime.errors import ResourceError

    qwen_self = next(s for s in project_70b.SCENARIOS if s.label == "Qwen2.5-32B fp16 + self-int4")
    qwen_small = next(s for s in project_70b.SCENARIOS if s.label == "Qwen2.5-32B fp16 + Qwen2.5-0.5B fp16")
    kw = dict(bandwidth_gbps=25.0, memory_gib=30.0, tflops=80.0, mem_gbps=900.0, p=[0.8, 0.1, 0.05])
    r = project_70b.project(scenario=qwen_self, **kw)
    # 64 layers at int4-g128 (0.52 bytes per weight) and no embedding or head of its own: ~16.6 GB
    assert 16.0e9 < r["draft_bytes"] < 17.0e9
    assert r["tokens_per_step"] > project_70b.project(scenario=qwen_small, **kw)["tokens_per_step"]
    llama_self = next(s for s in project_70b.SCENARIOS if s.label == "Llama-3.1-70B fp16 + self-int4")
    with pytest.raises(ResourceError, match="self-int4 draft .* use an external draft"):
        project_70b.project(scenario=llama_self, **{**kw, "memory_gib": 22.0})
