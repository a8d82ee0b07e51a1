"""Facts about the compiled graphs: what the passes rewrote, and that decode compiles once."""

import subprocess
import sys
import textwrap

import hae_fx
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs


def test_decode_graph_has_one_hae_attention_per_layer_and_never_recompiles(dynamo_counters):
    model = hae_fx.transform(tiny_llava(seed=0, text_layers=3), hae_fx.HAEConfig(policy="streaming", capacity=16,
                                                                                   sinks=2, window=4))
    inputs = llava_inputs(model, 1)
    model.generate(**inputs, max_new_tokens=51, do_sample=False)  # prefill + 50 decode steps

    (decode,) = model.hae_graphs["decode"]
    assert decode.report.layers == (0, 1, 2)
    assert decode.op_counts["hae.slot_attention.default"] == 3
    assert "scaled_dot_product_attention" not in decode.op_counts
    (prefill,) = model.hae_graphs["prefill"]
    assert prefill.report.layers == ()
    assert prefill.op_counts["hae.prefill_write_"] == 3

    assert dynamo_counters["graph_break"] == {}
    assert dynamo_counters["stats"]["unique_graphs"] == 2  # one prefill graph, one decode graph
    model.generate(**llava_inputs(model, 1, seed=5), max_new_tokens=20, do_sample=False)
    assert dynamo_counters["stats"]["unique_graphs"] == 2  # same prompt shape: nothing recompiled
    assert len(model.hae_graphs["decode"]) == 1


def test_backend_resolves_by_name_after_importing_only_torch():
    """The entry point registers `hae`: no `import hae_fx` needed before torch.compile."""
    script = textwrap.dedent("""
        import sys, torch
        import torch.nn.functional as F

        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(16, 48)

            def forward(self, x):
                q, k, v = self.proj(x).view(1, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        torch.manual_seed(0)
        model, x = Attention().eval(), torch.randn(1, 6, 16)
        with torch.no_grad():
            expected, got = model(x), torch.compile(model, backend="hae")(x)
        assert "hae_fx" in sys.modules, "the backend was not loaded"
        assert torch.allclose(expected, got, atol=1e-6), (expected - got).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
