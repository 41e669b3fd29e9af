"""`klinebus vlm evaluate` on a chart dataset (index.csv + images) with the tiny pair."""

from __future__ import annotations

import csv
import json

from .conftest import BTC_15M, chart_png


def write_dataset(folder, candles, ends):
    (folder / "images").mkdir(parents=True)
    with open(folder / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image", "symbol", "interval", "first_open_time", "last_open_time", "last_close", "next_close"))
        for end in ends:
            shown = candles[end - 30 : end]
            name = f"images/BTCUSDT-15m-{shown[-1].open_time}.png"
            chart_png(folder / name, shown, size=(320, 240))
            w.writerow((name, "BTCUSDT", "15m", shown[0].open_time, shown[-1].open_time, shown[-1].close, candles[end].close))


def test_evaluate_prints_a_scorecard_beside_baselines(tmp_path, tiny_pair, candles, capsys):
    import klinebus.cli as cli

    ends = [35, 45, 55, 65, 75]
    write_dataset(tmp_path / "charts", candles, ends)
    rc = cli.main([
        "vlm", "evaluate", "--charts", str(tmp_path / "charts"), "--input", str(BTC_15M), "--model", str(tiny_pair.model),
        "--mmproj", str(tiny_pair.mmproj), "--threads", "1", "--image-max-side", "224", "--image-max-tokens", "64",
        "--limit", "4", "--json",
    ])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)
    assert card["charts"] == 4 and card["analysed"] == 4 and card["failed"] == {}
    assert card["model"] == tiny_pair.model.name and card["seconds_per_chart"]["max"] > 0
    # baselines, computed here from the candles: hold hits when the next candle moved <= 5 bps
    flat = [abs(candles[e].close / candles[e - 1].close - 1) * 1e4 <= 5 for e in ends[-4:]]
    assert card["hit_rate"]["signal"]["hold"] == sum(flat) / 4
    assert 0 <= card["hit_rate"]["signal"]["vlm"] <= 1


def test_evaluate_without_a_dataset_is_one_line(tmp_path, capsys):
    import klinebus.cli as cli

    rc = cli.main(["vlm", "evaluate", "--charts", str(tmp_path), "--input", str(BTC_15M), "--model", "m", "--mmproj", "p"])
    assert rc == 2 and "has no index.csv" in capsys.readouterr().err
