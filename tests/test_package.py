import subprocess
import sys

import scanpy_canal


def test_import_is_lazy():
    code = (
        "import sys, scanpy_canal; "
        "heavy = sorted({'torch', 'scvi', 'lightning', 'scanpy'} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names_resolve():
    assert {"CANAL", "datasets", "nn", "pp", "tl"} <= set(dir(scanpy_canal))
    assert scanpy_canal.CANAL.__name__ == "CANAL"
    assert callable(scanpy_canal.pp.normalize) and callable(scanpy_canal.tl.annotate)


def test_cli_help_and_bad_input(capsys):
    from scanpy_canal.cli import main

    assert main(["demo", "--stages", "0"]) == 1
    assert "error" in capsys.readouterr().err


def test_demo_runs_a_stream_and_writes_json(tmp_path, capsys):
    import json

    from scanpy_canal.cli import main

    output = tmp_path / "demo.json"
    arguments = ["demo", "--stages", "2", "--epochs", "1", "--genes", "50", "--quiet", "--json", str(output)]
    assert main([*arguments, "--pretrain-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Accuracy after each stage" in printed and "h_score" in printed
    assert "Pretraining: 2 epochs, masked-token accuracy" in printed
    result = json.loads(output.read_text())
    assert result["accuracy"]["values"][0][1] is None and 0 <= result["accuracy"]["values"][1][0] <= 1
    assert {"acc", "bwt", "forgetting", "macro_f1", "ari", "h_score"} <= set(result["final"])
    assert 0 <= result["final"]["novel_auroc"] <= 1
    assert result["pretraining"]["epoch"] == [1, 2] and result["settings"]["pretrain_epochs"] == 2


def test_demo_pretrains_on_a_panel_smaller_than_n_top_genes():
    """HVG selection skips genes unexpressed in stage 1; the model must use the panel its encoder learnt."""
    from scanpy_canal._demo import run_stream
    from scanpy_canal.datasets import synthetic_stream

    stream = synthetic_stream(n_stages=2, n_genes=30, cells_per_type=12, n_novel_types=0)  # a calibration cell a type
    stream.train[0].X[:, 0] = 0
    stream.train[0].X.eliminate_zeros()
    tiny = {"dim": 8, "depth": 2, "heads": 2, "dim_head": 4}
    result = run_stream(
        stream, arch=tiny, n_top_genes=30, pretrain_epochs=1, max_epochs=1, accelerator="cpu", log=lambda line: None
    )
    assert result.accuracy.notna().to_numpy().sum() == 3
