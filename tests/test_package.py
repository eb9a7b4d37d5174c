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
