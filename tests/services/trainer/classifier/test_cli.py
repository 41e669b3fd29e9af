"""``klinebus dataset build --kind chart-classifier`` and ``klinebus train`` reach the classifier and
fail with one line where they cannot go on."""

from __future__ import annotations

from klinebus.cli import main

from .conftest import BTC_15M


def test_dataset_build_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "ds"
    code = main(["dataset", "build", "--kind", "chart-classifier", "--input", str(BTC_15M), "--symbol", "BTCUSDT",
                 "--interval", "15m", "--start", "2023-05-01", "--window", "10", "--train-fraction", "0.5",
                 "--validation-fraction", "0.25", "--set", "workers=0", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "index.csv").exists() and (out / "manifest.json").exists()


def test_train_with_a_hub_encoder_out_of_reach_is_one_line(btc_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the seed's Hub names cannot be fetched
    code = main(["train", "--dataset", str(btc_dataset), "--registry", str(tmp_path / "reg"), "--epochs", "1",
                 "--text-encoder", "bert-base-uncased"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("klinebus: error: cannot load the text encoder bert-base-uncased from the Hub (offline?): "
                   "use a local path or the default\n")
    assert not (tmp_path / "reg").exists()


def test_classifier_options_on_another_kind_are_refused(tmp_path, capsys):
    ds = tmp_path / "seq"
    ds.mkdir()
    (ds / "manifest.json").write_text('{"kind": "bilstm-ohlc"}')
    code = main(["train", "--dataset", str(ds), "--registry", str(tmp_path / "reg"), "--image-encoder", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--image-encoder is an option of chart-classifier datasets" in err


def test_the_printed_scorecard_shows_the_classes_beside_their_baselines(capsys):
    from services.trainer.cli import _print_card

    _print_card({"model": {"accuracy": 0.41, "macro_f1": 0.33, "mae": 0.5},
                 "majority_class": {"accuracy": 0.38, "macro_f1": 0.18}, "persistence": {"mae": 0.45}}, "validation")
    rows = {line.split()[1]: line.split()[3:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("│") and line.split()[1] in ("accuracy", "macro_f1", "mae")}
    assert rows == {"accuracy": ["0.41", "│", "0.38", "│", "–"], "macro_f1": ["0.33", "│", "0.18", "│", "–"],
                    "mae": ["0.5", "│", "–", "│", "0.45"]}
