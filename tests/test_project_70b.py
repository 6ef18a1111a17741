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
