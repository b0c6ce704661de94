"""Comparing runs: an overlay figure labelled by adapter/strategy/codec, a table, a per-client box plot."""
import pytest

from fedllm.cli import main
from fedllm.evaluation.compare import client_spread_figure, compare_table, overlay_figure

pytestmark = pytest.mark.slow


def test_plot_of_two_runs_writes_one_png_with_both_labels(pooled_run, per_client_run, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", str(pooled_run), str(per_client_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000
    fig = overlay_figure([pooled_run, per_client_run])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["pooled (lora/fedavg/no codec)", "per_client (lora/fedavg/no codec)"]
    assert [len(line.get_xdata()) for line in fig.axes[1].get_lines()] == [2, 2]  # eval loss vs bytes, per run


def test_compare_prints_one_row_per_run(pooled_run, per_client_run, capsys):
    assert main(["compare", str(pooled_run), str(per_client_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("pooled") and lines[2].startswith("per_client")
    assert compare_table([pooled_run]).splitlines()[0].startswith("run")


def test_the_per_client_spread_is_a_box_per_eval_round(per_client_run, pooled_run):
    fig = client_spread_figure(per_client_run)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2"]
    assert client_spread_figure(pooled_run) is None
    assert main(["plot", str(per_client_run)]) == 0
    assert (per_client_run / "plots" / "clients.png").stat().st_size > 5000
