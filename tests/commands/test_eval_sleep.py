"""`neat eval-sleep`: flags reach every protocol that has the field, JSON + PNG + table, worker processes."""

from __future__ import annotations

import json

import pytest

from neat_lightning.commands.eval_sleep import configure, main, parser
from tests.conftest import neat

TINY = ["--table-steps", "2", "--domain-steps", "2", "--n-facts", "2", "--batch-size", "2", "--block-size", "32",
        "--dim", "16", "--heads", "2", "--n-layers", "1", "--window", "8", "--dim-memory", "8", "--memory-size", "16",
        "--eval-every", "2", "--eval-windows", "2", "--wake-steps", "2", "--sleep-steps", "1", "--replay-size", "2",
        "--capacity", "8"]


def test_flags_reach_every_protocol_that_has_the_field():
    args = parser().parse_args(["--batch-size", "3", "--wake-steps", "7", "--table-steps", "9"])
    changes = {k: v for k, v in vars(args).items() if v is not None and k in ("batch_size", "wake_steps", "table_steps")}
    ab, tables4, lm = (configure(p, changes) for p in ("ab", "tables4", "bytes"))
    assert ab.batch_size == tables4.batch_size == lm.batch_size == 3
    assert ab.sleep.wake_steps == tables4.sleep.wake_steps == lm.sleep.wake_steps == 7
    assert (ab.table_steps, tables4.table_steps, ab.tables, tables4.tables) == (9, 9, 2, 4)
    assert configure("bytes", {})== configure("bytes", {"table_steps": 9})  # a field bytes lacks is ignored
    assert parser().parse_args([]).protocols == ["ab"]


def test_command_writes_results(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["--seeds", "3", *TINY, "--workers", "1", "--distill-weight", "0.5", "--adaptive-rate", "true",
                 "--sleep-steps", "2",
                 "--out-json", str(out_json), "--out-png", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["seeds"] == [3] and data["protocols"] == ["ab"]
    assert data["config"]["ab"]["sleep"]["distill_weight"] == 0.5 and data["config"]["ab"]["sleep"]["adaptive_rate"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sleep - no_sleep (95% CI)" in capsys.readouterr().out


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--wake-steps", "0"])
    assert "SleepSettings.wake_steps=0 must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_every_protocol_in_two_worker_processes(tmp_path):
    """The real command in a subprocess: all three protocols, two workers (spawned), one table each."""
    proc = neat("eval-sleep", "--protocols", "ab", "tables4", "bytes", "--seeds", "0", *TINY, "--workers", "2",
                "--out-json", str(tmp_path / "r.json"), "--out-png", str(tmp_path / "r.png"), cwd=tmp_path, timeout=600)
    assert "[ab]" in proc.stdout and "[tables4]" in proc.stdout and "[bytes]" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["workers"] == 2 and len(data["runs"]) == 9
    assert {"tables4/sleep/final_recall_d", "bytes/replay/bpb_first", "sleep/final_recall_a",
            "tables4/diff/sleep-replay/mean_final_recall_earlier"} <= set(data["summary"])
