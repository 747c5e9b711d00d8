"""bench.needles: the targets it checks, on rows made up to pass and to fail each one."""

import pytest

from bench.needles import parse_args, targets


def row(method, budget, set_, depth, correct):
    return dict(method=method, budget_given=None if method == "full" else budget, set=set_, depth=depth,
                correct=correct, item=f"{set_}: {depth}")


def rows(tri_25, tri_125, snapkv_125):
    """Two sets of two depths; full attention answers all four; SnapKV all four at 25%."""
    out = []
    for i, (set_, depth) in enumerate((("A", 0.1), ("A", 0.5), ("B", 0.1), ("B", 0.5))):
        out += [row("full", None, set_, depth, True), row("snapkv", 0.25, set_, depth, True),
                row("triattention-auto", 0.25, set_, depth, tri_25[i]),
                row("triattention-auto", 0.125, set_, depth, tri_125[i]),
                row("snapkv", 0.125, set_, depth, snapkv_125[i])]
    return out


def verdicts(checks):
    return {c["target"]: c["met"] for c in checks if c["method"] == "triattention-auto"}


def test_every_target_met():
    got = verdicts(targets(rows([True] * 4, [True, True, True, False], [True, False, False, False])))
    assert got == {"25%: every depth at least 95% of full attention": True,
                   "25%: mean level with or ahead of snapkv": True, "12.5%: mean ahead of snapkv": True}


def test_a_lost_depth_and_a_tie_are_not_met():
    checks = targets(rows([True, True, True, False], [True, True, False, False], [True, True, False, False]))
    got = verdicts(checks)
    assert got["25%: every depth at least 95% of full attention"] is False
    assert got["25%: mean level with or ahead of snapkv"] is False  # 0.75 against 1.0
    assert got["12.5%: mean ahead of snapkv"] is False  # level is not ahead
    lost = next(c for c in checks if c["target"].startswith("25%: every depth"))
    assert lost["detail"] == "B depth 0.5: 0.00 against full 1.00"


def test_full_attention_is_required():
    with pytest.raises(SystemExit):
        parse_args(["--methods", "triattention-auto", "snapkv"])
