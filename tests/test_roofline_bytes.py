"""bench/roofline_bytes.py's breakdown of an optimised HLO module's bytes, on a small hand-written module: which
instructions count (top-level ones, not a fusion's insides; loops and tuples not), where they run (the layer loop or
outside), their kind, element types and model part."""

import pytest

HLO = """HloModule m

%fused_dot (p0: bf16[8,16], p1: bf16[16,16]) -> f32[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,16]{1,0} parameter(1)
  ROOT %d = f32[8,16]{1,0} dot(bf16[8,16]{1,0} %p0, bf16[16,16]{1,0} %p1), lhs_contracting_dims={1}
}

%body (param: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %param = (s32[], f32[8,16]{1,0}) parameter(0)
  %gte = f32[8,16]{1,0} get-tuple-element((s32[], f32[8,16]{1,0}) %param), index=1
  %fusion = f32[8,16]{1,0} fusion(bf16[8,16]{1,0} %a, bf16[16,16]{1,0} %b), kind=kOutput, calls=%fused_dot, \
metadata={op_name="jit(f)/jvp(IGPT)/IGPT._run/while/body/closed_call/blocks/mlp/dot_general"}
  %ag = f32[32,16]{1,0} all-gather(f32[8,16]{1,0} %gte), dimensions={0}, \
metadata={op_name="jit(f)/transpose(jvp(IGPT))/IGPT._run/while/body/closed_call/blocks/attn/dot_general"}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(s32[] %i, f32[8,16]{1,0} %fusion)
}

%cond (param: (s32[], f32[8,16])) -> pred[] {
  %param = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(s32[] %x, s32[] %y), direction=LT
}

ENTRY %main (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]{1,0}) while((s32[], f32[8,16]{1,0}) %init), condition=%cond, body=%body
  %buf = f32[64,16]{1,0} custom-call(), custom_call_target="AllocateBuffer", metadata={op_name="broadcast.1"}
  ROOT %add = f32[8,16]{1,0} add(f32[8,16]{1,0} %p, f32[8,16]{1,0} %p), metadata={op_name="jit(f)/add"}
}
""".replace("\\\n", "")


@pytest.fixture(scope="module")
def roofline(bench_script):
    return bench_script("roofline_bytes")


def test_breakdown_of_a_small_module(roofline):
    b = roofline.breakdown(HLO, n_layer=4)
    # fusion: f32[8,16] out 512 + bf16 operands 256 + 512; all-gather: 2,048 out + 512 in; compare: 1 + 4 + 4;
    # add: 3 x 512. The while, tuple, get-tuple-element, parameters and AllocateBuffer carry nothing themselves.
    assert b["total"] == 1280 + 2560 + 9 + 1536
    assert b["where"] == {"scan over layers": 1280 + 2560, "outside the layer loop": 9 + 1536}
    assert b["kind"] == {"matmul fusion": 1280, "all-gather": 2560, "compare": 9, "add": 1536}
    assert b["dtype"] == {"f32": 512 + 2560 + 1536, "bf16": 768, "s32": 8, "pred": 1}
    assert b["part"] == {"mlp": 1280, "attention (backward)": 2560, "optimizer, metrics, other": 9 + 1536}
    assert b["biggest"][0][:3] == (2560, "scan over layers", "all-gather")
    assert "2560" not in roofline.format_breakdown(b, 4096.0, 2)  # sizes are printed in GiB


def test_a_known_trip_count_is_the_loops(roofline):
    hlo = HLO.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"8"}}')
    trips = roofline.top_level(*roofline.split_computations(hlo), loop_trips=4)
    assert trips == {"main": 1, "cond": 1, "body": 8}


def test_loop_aware_bytes_count_the_body_per_layer_and_the_rest_once(roofline):
    # 7 outside the scan, 3 per layer: the step as configured counts 7 + 3, unrolled twice as far 7 + 6.
    assert roofline.loop_aware_bytes(10.0, 13.0, n_layer=24, unroll=1) == {"per_layer": 3.0, "outside": 7.0,
                                                                           "total": 7.0 + 24 * 3.0}
    # The same step configured with unroll 2 (7 + 6; unrolled to 4: 7 + 12) gives the same answer.
    assert roofline.loop_aware_bytes(13.0, 19.0, n_layer=24, unroll=2)["total"] == 79.0
    assert roofline.loop_aware_bytes(10.0, 13.0, n_layer=24, unroll=1, accum=2)["total"] == 7.0 + 48 * 3.0
