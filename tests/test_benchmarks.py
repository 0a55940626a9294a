"""The benchmark suite runs (quick mode, tiny sizes) and writes its JSON and chart. No timing is asserted."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run  # noqa: E402


def test_quick_cases_write_json_and_chart(tmp_path):
    out = run.main(["--quick", "--cases", "2,3,5,8", "--reps", "1", "--warmup", "1", "--threads", "1",
                    "--out", str(tmp_path)])
    path = tmp_path / "cpu-quick.json"
    assert path.exists() and (tmp_path / "cpu-quick.png").stat().st_size > 0
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(out, default=float))
    assert data["device"] == "cpu" and data["quick"] is True and data["threads"] == 1
    assert [c["case"] for c in data["cases"]] == ["2", "3", "5", "8"]
    for c in data["cases"]:
        assert not c["errors"], c["errors"]
        assert c["rows"] and c["targets"]
        for row in c["rows"]:
            assert {"metric", "unit", "ours", "peft", "ratio"} <= set(row)
            assert row["ours"] > 0
            if c["case"] == "8" and row["metric"].startswith(("prefix", "prompt")):   # against the base only
                assert row["peft"] is None and row["ratio"] is None and row["base"] > 0
                continue
            assert row["peft"] > 0 and row["ratio"] == row["ours"] / row["peft"]
        for t in c["targets"]:
            assert {"name", "value", "limit", "better", "met"} <= set(t)
            assert t["better"] in ("<=", ">=")
            assert t["met"] is (t["value"] <= t["limit"] if t["better"] == "<=" else t["value"] >= t["limit"])
    cases = {c["case"]: c for c in data["cases"]}
    # both libraries computed the same thing before being timed
    assert cases["2"]["extra"]["parity_max_abs_diff_unmerged"] < 1e-4
    assert cases["3"]["extra"]["parity_max_abs_diff_prefill"] < 1e-4
    for n in cases["8"]["setup"]["adapters"]:   # a decoding step with each count of adapters, one per row
        assert cases["8"]["extra"][f"parity_max_abs_diff_{n}"] < 1e-4
    # a step per count of adapters, prefix and prompt decoding (the prompt also in the sequence), and the first
    # prefill after one adapter of the most is replaced
    assert len([r for r in cases["8"]["rows"] if r["unit"] == "ms"]) == len(cases["8"]["setup"]["adapters"]) + 4
    assert cases["8"]["extra"]["prompt_apart_vs_in_sequence_max_abs_diff"] < 1e-4
    assert [r for r in cases["8"]["rows"] if "replaced" in r["metric"]][0]["ours_steady"] > 0
    # the sites of the case-5 model, counted here from its modules: every linear (head included), the embedding,
    # every norm weight, one attention per layer
    import torch
    from benchmarks.common import llama
    setup = cases["5"]["setup"]
    model = llama(setup["hidden"], setup["layers"], setup["heads"], setup["kv_heads"], setup["inter"], setup["vocab"],
                  meta=True)
    mods = list(model.modules())
    expected = (sum(isinstance(m, torch.nn.Linear) for m in mods) + sum(isinstance(m, torch.nn.Embedding) for m in mods)
                + sum(type(m).__name__.endswith("Attention") for m in mods)
                + sum(type(m).__name__.endswith("RMSNorm") for m in mods))   # norm weights are sites too
    assert expected == 7 * setup["layers"] + 1 + 1 + setup["layers"] + 2 * setup["layers"] + 1
    assert cases["5"]["extra"]["sites"] == expected


def test_scale_1b_is_tinyllamas_shape_in_bfloat16_on_a_gpu(tmp_path):
    from benchmarks.cases import sizes
    from benchmarks.common import Ctx
    import torch
    z = sizes(Ctx("cuda", scale="1b"))
    assert (z["hidden"], z["layers"], z["heads"], z["kv_heads"], z["inter"], z["seq"]) == (2048, 22, 32, 4, 5632, 512)
    assert Ctx("cuda", scale="1b").dtype == torch.bfloat16 and Ctx("cpu", scale="1b").dtype == torch.float32
    assert Ctx("cuda").dtype == torch.float32
    out = run.main(["--quick", "--scale", "1b", "--cases", "5", "--reps", "1", "--warmup", "1", "--threads", "1",
                    "--out", str(tmp_path)])
    assert out["scale"] == "1b" and (tmp_path / "cpu-1b-quick.json").exists()


def test_compiled_case_counts_graph_breaks_and_checks_parity(tmp_path):
    """Case 9 on the eager backend (tracing only): ours traces in one graph like the bare base, and the compiled
    model gives what the eager one gives, and PEFT's logits."""
    out = run.main(["--quick", "--cases", "9", "--reps", "1", "--warmup", "1", "--threads", "1", "--backend", "eager",
                    "--out", str(tmp_path)])
    case = out["cases"][0]
    assert not case["errors"], case["errors"]
    extra = case["extra"]
    assert extra["graph_breaks_ours"] == extra["graph_breaks_base"] == 0
    assert extra["parity_compiled_max_abs_diff"] < 1e-5 and extra["parity_peft_max_abs_diff"] < 1e-5
    assert [r["metric"] for r in case["rows"]] == ["forward, eager", "training step, eager", "forward, compiled",
                                                   "training step, compiled"]
