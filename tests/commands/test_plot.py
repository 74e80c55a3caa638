import pytest

from neat_lightning.commands.plot import main, plot_run, read_metrics


def write_run(run, rows, version=0):
    d = run / f"version_{version}"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text("epoch,step,train/loss,val/loss,val/bpb\n" + "\n".join(rows) + "\n")


def test_plot_writes_one_png_per_group(tmp_path):
    run = tmp_path / "runs" / "r"
    write_run(run, ["0,0,5.0,,", "0,1,4.0,,", "0,1,,4.5,6.49", "1,2,3.0,,"])
    series = read_metrics(run / "version_0" / "metrics.csv")
    assert series["train/loss"] == [(0, 5.0), (1, 4.0), (2, 3.0)] and series["val/bpb"] == [(1, 6.49)]
    written = plot_run(run, run / "plots")
    assert sorted(p.name for p in written) == ["bpb.png", "loss.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_plot_errors_name_the_path(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no version_\\*/metrics.csv under"):
        plot_run(tmp_path / "empty", tmp_path / "out")
