"""The command line: each command end to end, and bad input as one error line with no output."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from onnxcompress.cli import main


def cli(*args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_model_report_and_table(tiny_path, tiny_calib, tmp_path, capsys):
    out = tmp_path / "out" / "tiny.opt.onnx"
    code, stdout, err = cli("optimize", tiny_path, "-o", out, "-p", "cleanup,test-add-identity",
                            "--calib", tiny_calib, capsys=capsys)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(out))
    report = json.loads((out.parent / "tiny.opt.report.json").read_text())
    assert report["pipeline"] == "cleanup,test-add-identity"
    assert [p["status"] for p in report["passes"]] == ["unchanged", "changed"]
    for column in ("pass", "rewritten", "refused", "params", "bytes", "MACs", "drift", "time"):
        assert column in stdout
    assert "inf dB" in stdout


def test_optimize_with_explicit_report_path(tiny_path, tmp_path, capsys):
    code, _, err = cli("optimize", tiny_path, "-o", tmp_path / "o.onnx", "-p", "cleanup",
                       "--report", tmp_path / "r.json", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["name"] == "cleanup"


def test_print_pipeline_prints_back_exactly(capsys):
    code, out, _ = cli("optimize", "--print-pipeline", "-p", "test-needs-scale,cleanup{deduplicate=false}", capsys=capsys)
    assert code == 0
    printed = out.strip()
    assert printed == "test-scale-weight,test-needs-scale,cleanup{deduplicate=false}"
    code, again, _ = cli("optimize", "--print-pipeline", "-p", printed, capsys=capsys)
    assert again.strip() == printed


def test_drift_rollback_is_named_in_table_and_report(tiny_path, tiny_calib, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, _ = cli("optimize", tiny_path, "-o", out, "-p", "test-scale-weight{factor=3.0}",
                          "--calib", tiny_calib, "--drift-budget", "sqnr=40", capsys=capsys)
    assert code == 0
    assert "rolled back" in stdout and "drift over budget" in stdout
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["passes"][0]["status"] == "rolled back"


def test_drift_fail_exits_nonzero_writes_nothing_and_prints_reproducer(tiny_path, tiny_calib, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, err = cli("optimize", tiny_path, "-o", out, "-p", "test-scale-weight{factor=3.0}",
                            "--calib", tiny_calib, "--drift-budget", "sqnr=40", "--on-drift", "fail",
                            "--reproducer-dir", tmp_path / "repro", capsys=capsys)
    assert code == 3
    assert err.count("\n") == 1 and "reproducer: " in err
    assert not out.exists()
    folder = err.split("reproducer: ")[1].rstrip(")\n")
    assert (tmp_path / "repro").resolve() in __import__("pathlib").Path(folder).resolve().parents


def test_bisect_and_dump_flags(tiny_path, tmp_path, capsys):
    dump = tmp_path / "dump"
    code, stdout, _ = cli("optimize", tiny_path, "-o", tmp_path / "o.onnx", "-p",
                          "test-add-identity,test-scale-weight{factor=2.0}", "--bisect-limit", "1",
                          "--print-after-change", dump, capsys=capsys)
    assert code == 0
    assert "BISECT: NOT running pass (2) test-scale-weight{factor=2.0}" in stdout
    assert sorted(p.name for p in dump.iterdir()) == ["000_input.onnx", "001_test-add-identity.onnx"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "cleanup{"], "bad pipeline at column 9"),
        (["-p", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["-p", "cleanup{deduplicate=perhaps}"], "option 'deduplicate' must be true or false"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["-p", "cleanup", "--drift-budget", "speed=3", "--random-calib", "2"], "bad drift budget 'speed=3'"),
        (["-p", "cleanup", "--drift-budget", "sqnr=30"], "needs calibration data"),
        (["-p", "cluster-weights{assign=gptq,min_elements=0}"], "cluster-weights{assign=gptq} needs calibration data"),
    ],
)
def test_bad_arguments_one_line_nonzero_nothing_written(tiny_path, tmp_path, capsys, args, message):
    out = tmp_path / "o.onnx"
    code, _, err = cli("optimize", tiny_path, "-o", out, *args, capsys=capsys)
    assert code != 0
    assert message in err and err.startswith("onnxcompress: error: ") and err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_bad_model_and_bad_calibration(tmp_path, tiny_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_path.read_bytes()[:100])
    code, _, err = cli("optimize", broken, "-o", tmp_path / "o.onnx", capsys=capsys)
    assert code == 2 and "not a valid ONNX model" in err and err.count("\n") == 1
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, x=np.zeros((1, 4), np.float64))
    code, _, err = cli("optimize", tiny_path, "-o", tmp_path / "o.onnx", "--calib", bad, capsys=capsys)
    assert code == 2 and "input 'x' expects float32" in err
    assert not (tmp_path / "o.onnx").exists()


def test_output_must_differ_from_input(tiny_path, capsys):
    before = tiny_path.read_bytes()
    code, _, err = cli("optimize", tiny_path, "-o", tiny_path, capsys=capsys)
    assert code == 2 and "must not be the input" in err
    assert tiny_path.read_bytes() == before


def test_inspect_table_and_json(tiny_path, capsys):
    code, out, _ = cli("inspect", tiny_path, capsys=capsys)
    assert code == 0
    assert "fc1" in out and "total: 67 parameters, 268 bytes, 56 MACs" in out
    assert "Gemm 2" in out
    code, out, _ = cli("inspect", tiny_path, "--json", capsys=capsys)
    data = json.loads(out)
    assert data["params"] == 67 and data["macs"] == 56
    assert "candidates" in data


def test_compare_outputs_and_per_node(tiny_path, tiny_calib, tmp_path, capsys):
    import onnxcompress

    other = tmp_path / "other.onnx"
    onnxcompress.compress(tiny_path, "test-scale-weight{factor=1.01}").save(other)
    code, out, _ = cli("compare", tiny_path, other, "--calib", tiny_calib, "--per-node", capsys=capsys)
    assert code == 0
    assert "y" in out and "dB" in out
    lines = out.split("worst first")[1].splitlines()
    assert any(line.startswith("h ") for line in lines)
    code, out, _ = cli("compare", tiny_path, other, "--calib", tiny_calib, "--per-node", "--json", capsys=capsys)
    data = json.loads(out)
    assert data["outputs"]["y"]["sqnr_db"] < 60
    assert {t["name"] for t in data["tensors"]} == {"h", "r", "y"}


def test_compare_same_model_is_exact(tiny_path, tiny_calib, capsys):
    code, out, _ = cli("compare", tiny_path, tiny_path, "--calib", tiny_calib, "--json", capsys=capsys)
    data = json.loads(out)
    assert data["outputs"]["y"] == {"sqnr_db": "inf", "max_abs": 0.0, "cosine": pytest.approx(1.0), "top1": 1.0}


def test_compare_without_data_is_an_error(tiny_path, capsys):
    code, _, err = cli("compare", tiny_path, tiny_path, capsys=capsys)
    assert code == 2 and "--calib" in err


def test_list_passes_shows_options_and_presets(capsys):
    code, out, _ = cli("list-passes", capsys=capsys)
    assert code == 0
    assert "cleanup: " in out and "deduplicate=true" in out and "presets:" in out and "default:" in out
    code, out, _ = cli("list-passes", "--json", capsys=capsys)
    data = json.loads(out)
    names = {p["name"] for p in data["passes"]}
    assert {"cleanup", "lift-constants", "fold-constants", "fold-batchnorm", "infer-shapes"} <= names


def test_entry_point_runs_as_a_module(tiny_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxcompress", "inspect", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("onnxcompress: error:") and "Traceback" not in proc.stderr


def test_inspect_input_shape_fixes_symbolic_dims(tiny_path, capsys):
    code, out, _ = cli("inspect", tiny_path, "--json", "--input-shape", "x=4,4", capsys=capsys)
    assert code == 0 and json.loads(out)["macs"] == 4 * 56
    code, _, err = cli("inspect", tiny_path, "--input-shape", "x=a,b", capsys=capsys)
    assert code == 2 and "--input-shape 'x=a,b'" in err
    code, _, err = cli("inspect", tiny_path, "--input-shape", "nope=1,4", capsys=capsys)
    assert code == 2 and "nope" in err


def test_int8_preset_end_to_end_and_without_calibration(tiny_path, tiny_calib, tmp_path, capsys):
    out = tmp_path / "tiny.int8.onnx"
    code, _, err = cli("optimize", tiny_path, "-o", out, "--preset", "int8", capsys=capsys)
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "--calib" in err and "reproducer" not in err
    code, stdout, err = cli("optimize", tiny_path, "-o", out, "--preset", "int8", "--calib", tiny_calib, capsys=capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "tiny.int8.report.json").read_text())
    passes = {p["name"]: p for p in report["passes"]}
    # An MLP (no convolution): dynamic int8, not static QDQ.
    assert passes["quantize-qdq"]["status"] == "unchanged"
    assert any("matmul_only=leave" in n for n in passes["quantize-qdq"]["notes"])
    assert passes["quantize-dynamic"]["status"] == "changed"
    assert [n.op_type for n in onnx.load(out).graph.node] == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    static = tmp_path / "tiny.qdq.onnx"
    code, _, err = cli("optimize", tiny_path, "-o", static, "-p", "default,quantize-qdq", "--calib", tiny_calib,
                       capsys=capsys)
    assert code == 0, err
    qdq = next(p for p in json.loads((tmp_path / "tiny.qdq.report.json").read_text())["passes"]
               if p["name"] == "quantize-qdq")
    assert qdq["status"] == "changed" and any("onnxruntime runs" in n for n in qdq["notes"])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(static).graph.node}


def test_pack_unpack_round_trip_bit_for_bit(tiny_path, tmp_path, capsys):
    clustered = tmp_path / "clustered.onnx"
    code, _, err = cli("optimize", tiny_path, "-o", clustered, "-p", "cluster-weights{clusters=4,min_elements=0}",
                       capsys=capsys)
    assert code == 0, err
    archive, restored = tmp_path / "m.onnxz", tmp_path / "back" / "m.onnx"
    code, out, err = cli("pack", clustered, "-o", archive, capsys=capsys)
    assert code == 0, err
    assert f"wrote {archive}" in out and archive.stat().st_size < clustered.stat().st_size
    code, out, err = cli("unpack", archive, "-o", restored, capsys=capsys)
    assert code == 0, err
    assert restored.read_bytes() == clustered.read_bytes()


def matmul_model_path(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_inspect_storage_shows_bits_per_weight_per_encoding(tmp_path, capsys):
    clustered = tmp_path / "clustered.onnx"
    assert cli("optimize", matmul_model_path(tmp_path), "-o", clustered, "-p", "cluster-weights{clusters=4}",
               capsys=capsys)[0] == 0
    code, out, err = cli("inspect", "--storage", clustered, capsys=capsys)
    assert code == 0, err
    header = out.splitlines()[0]
    for column in ("tensor", "elements", "stored b/w", "codebook b/w", "chosen"):
        assert column in header
    assert "bytes packed" in out
    code, out, _ = cli("inspect", "--storage", "--json", clustered, capsys=capsys)
    tensors = json.loads(out)
    assert [t["chosen"] for t in tensors] == ["codebook"]
    assert [e["encoding"] for e in tensors[0]["encodings"]][:2] == ["stored", "codebook"]
    assert all({"name", "dtype", "elements", "raw_bytes", "encodings", "chosen"} <= set(t) for t in tensors)


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_pack_and_unpack_bad_input_one_line_nothing_written(command, tmp_path, capsys):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"\x00\x01garbage")
    out = tmp_path / "out.file"
    code, _, err = cli(command, broken, "-o", out, capsys=capsys)
    assert code != 0
    assert err.startswith("onnxcompress: error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and broken.read_bytes() == b"\x00\x01garbage"
    code, _, err = cli(command, tmp_path / "missing", "-o", out, capsys=capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and not out.exists()
