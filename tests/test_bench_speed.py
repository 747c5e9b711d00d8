"""bench.speed's decode comparison: the order of the turns and the paired ratios."""

import mlx.core as mx
import pytest

from bench import speed


def test_the_reference_runs_between_every_two_turns_and_the_order_rotates(monkeypatch):
    calls = []

    def fake_decode(model, cache, y, steps):
        calls.append(cache)
        return 100.0, y

    monkeypatch.setattr(speed, "decode", fake_decode)
    contestants = {label: (label, None, False) for label in ("ceiling", "a", "b")}
    turns = speed.decode_in_turns(None, contestants, 4, 2, between="ceiling")
    assert [label for label, _ in turns] == ["ceiling", "a", "ceiling", "b", "ceiling",
                                              "ceiling", "b", "ceiling", "a", "ceiling"]
    assert calls == [label for label, _ in turns]
    assert [label for label, _ in speed.decode_in_turns(None, contestants, 4, 2)] == ["ceiling", "a", "b",
                                                                                     "a", "b", "ceiling"]


def test_paired_ratios_compare_each_turn_with_the_reference_turns_beside_it():
    turns = [("ceiling", 100.0), ("a", 90.0), ("ceiling", 80.0), ("b", 40.0), ("ceiling", 120.0), ("a", 60.0)]
    ratios = speed.paired_ratios(turns, "ceiling")
    assert ratios["a"] == pytest.approx([90 / 90, 60 / 120])
    assert ratios["b"] == pytest.approx([40 / 100])
    assert speed.rates_by_label(turns) == {"ceiling": [100.0, 80.0, 120.0], "a": [90.0, 60.0], "b": [40.0]}


def test_without_taps_runs_the_bare_model_and_puts_the_taps_back(tiny_model):
    from triattn_mlx.taps import LatestQueries, install_latest_queries

    taps = install_latest_queries(tiny_model)
    attentions = [layer.self_attn for layer in tiny_model.layers]
    with speed.without_taps(tiny_model):
        assert not any(isinstance(a.rope, LatestQueries) for a in attentions)
        tiny_model(mx.array([[1, 2, 3]]))
    assert all(taps[i].latest is None for i in taps)  # the taps saw nothing
    assert [a.rope for a in attentions] == [taps[i] for i in range(len(attentions))]
