"""Tests of selfjudge.py: the noisy labels are a consistent estimate of P, and the study runs end to
end, shortened (300 teaching steps instead of 800, 4 training steps): teaching brings both judges
closer to P, a frozen judge keeps its error, and a player's adapter on the judge moves it."""
import pytest
import torch

import selfjudge as SJ


def test_noisy_labels_are_a_consistent_estimate_of_P():
    P = torch.tensor([[[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]]], dtype=torch.float64)
    est = SJ.noisy_labels(P, 8, torch.Generator().manual_seed(0))
    assert torch.equal(est + est.transpose(1, 2), torch.ones_like(P))  # P̂(y' ≻ y) = 1 − P̂(y ≻ y')
    assert torch.equal(est * 8, (est * 8).round())                       # counts out of m = 8 duels
    many = SJ.noisy_labels(P.expand(4000, 3, 3), 8, torch.Generator().manual_seed(0)).mean(0)
    assert (many - P[0]).abs().max() < 0.02                                 # unbiased: mean → P


def test_the_study_runs_and_measures_its_judges(tmp_path, monkeypatch):
    taught, real = [], SJ.teach_judge

    def teach(model, task, labels):
        before = task.judge.error(model, None, task)
        taught.append((before, real(model, task, labels, steps=300)))
        return taught[-1][1]
    monkeypatch.setattr(SJ, "teach_judge", teach)
    cfg = SJ.StudyConfig(out=str(tmp_path / "out"), figure=str(tmp_path / "fig.png"), steps=4)
    logs = SJ.main(cfg)
    assert all(after < 0.9 * before for before, after in taught)  # both judges move toward P
    assert set(logs) == {name for name, _, _ in SJ.RUNS}
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    err = {name: [r["judge_err"] for r in recs if "judge_err" in r] for name, recs in logs.items()}
    assert err["maio_pg"][0] == pytest.approx(taught[0][1], abs=1e-6)   # the taught base judges...
    assert err["maio_pg"][0] == err["maio_pg"][-1] == err["inpo"][-1]  # ...and, frozen, stays
    assert err["lana_self"][0] == pytest.approx(taught[0][1], abs=1e-6)  # adapters start at B = 0
    assert err["lana_self"][-1] != err["lana_self"][0]   # the other player's adapter moves it
