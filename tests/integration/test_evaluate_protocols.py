"""scripts/evaluate_protocols.py: the protocol table from real bundle evaluations, beside the box baselines."""

import importlib.util
import json
import os

import pytest
import torch

from conftest import tiny_model
from imedsam.data import polyp_datalist, write_synthetic_dataset
from imedsam.metrics import score_box_baselines

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "evaluate_protocols.py")


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_protocols", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_table_rows_match_the_bundle_summaries_and_baselines(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "home", count=6, size=(48, 56))
    write_synthetic_dataset(tmp_path / "other", count=3, size=(40, 40), seed=7)
    torch.save(tiny_model(fa_mode="none").state_dict(), tmp_path / "model.pt")  # evaluated with --set fa_mode none
    output = tmp_path / "table.md"
    args = [
        "--checkpoint", str(tmp_path / "model.pt"), "--encoder", "vit_tiny", "--image_size", "64", "--dataset_dir", str(tmp_path / "home"),
        "--cross_domain_dir", str(tmp_path / "other"), "--train_size", "48", "--label_sizes", "32", "48",
        "--work_dir", str(tmp_path / "work"), "--output", str(output), "--set", "fa_mode", "none",
    ]
    assert _script().main(args) == 0
    record = json.loads((tmp_path / "table.json").read_text())
    assert [(r["protocol"], r["size"]) for r in record["rows"]] == [("in-domain", 48), ("cross-resolution", 32), ("cross-domain", 48)]
    for row in record["rows"]:
        name = f"{row['protocol']}_{os.path.basename(row['data'])}_{row['size']}"
        summary = json.loads((tmp_path / "work" / name / "summary.json").read_text())
        assert row["model"] == summary and summary["label_size"] == row["size"]
        expected = score_box_baselines(polyp_datalist(row["data"], row["split"]), row["size"])
        assert row["baselines"]["ellipse_in_box"]["dice"]["mean"] == pytest.approx(expected["ellipse_in_box"]["dice"]["mean"])
    assert record["rows"][2]["model"]["count"] == 3  # every image of the other dataset
    table = output.read_text().splitlines()
    rows = [line for line in table if line.startswith("| in-domain") or line.startswith("| cross")]
    assert len(rows) == 3 and f"{record['rows'][1]['model']['dice']['mean']:.4f}" in rows[1]
    assert sum(line.startswith("python -m monai.bundle run") for line in table) == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _script().main(["--checkpoint", str(tmp_path / "none.pt"), "--dataset_dir", str(tmp_path)])
    assert stop.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
