"""exgrpo_advantages: the DSU bonus and group-relative normalisation against the float64 loop spec,
every backend (the `backend` fixture), within 2x the spec's own error in float32."""
import exgrpo.kernels as K
import pytest
import torch
from _helpers import assert_like_eager
from exgrpo.kernels import reference as R


def random_case(Q, G, seed, p_full=0.5):
    g = torch.Generator().manual_seed(seed)
    outcome = (torch.rand(Q, G, generator=g) < 0.5).float()
    is_full = torch.rand(Q, G, generator=g) < p_full
    outcome[0] = 1.0                        # an all-correct question: equal totals unless the bonus splits them
    outcome[1] = 0.0                        # an all-wrong one: always 0
    return outcome, is_full


@pytest.mark.parametrize("group_by", ["question", "scenario"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("Q,G", [(7, 16), (5, 11), (3, 1), (4, 2), (2, 1500)])
def test_matches_spec(backend, group_by, scale, Q, G):
    outcome, is_full = random_case(Q, G, seed=Q * 100 + G)
    kw = dict(delta=0.5, nu=1.0, eps=1e-6, scale=scale, group_by=group_by)
    a_r, t_r, f_r = R.exgrpo_advantages_ref(outcome, is_full, **kw)
    a_e, t_e, _ = R.exgrpo_advantages_ref(outcome, is_full, dtype=torch.float32, **kw)
    a, t, f = K.exgrpo_advantages(outcome, is_full, backend=backend, **kw)
    assert a.dtype == torch.float32 and t.dtype == torch.float32 and f.dtype == torch.bool
    assert torch.equal(f, f_r)
    assert torch.equal(t.double(), t_r), "totals are R_base + delta: exact in fp32"
    assert_like_eager(a, a_r, a_e, f"{backend} advantages")


def test_degenerate_groups_get_zero(backend):
    outcome = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    is_full = torch.tensor([[False] * 4, [True, True, False, False], [True, False, True, False]])
    a, t, f = K.exgrpo_advantages(outcome, is_full, backend=backend)
    assert (a[0] == 0).all(), "all-equal totals (no full trajectory, so no bonus)"
    assert (a[1] == 0).all(), "all wrong: P_full = P_partial = 0 does not fire"
    assert not f[1]
    # question 2: full trajectories are the correct ones; P_full = 1 > P_partial = 0 fires
    assert f[2] and torch.equal(t[2], torch.tensor([1.5, 0.0, 1.5, 0.0]))
    # per scenario every sub-group is all-equal -> all zero
    a_s, _, _ = K.exgrpo_advantages(outcome, is_full, group_by="scenario", backend=backend)
    assert (a_s[2] == 0).all()
    # a group of one
    a1, _, _ = K.exgrpo_advantages(torch.tensor([[1.0]]), torch.tensor([[True]]), backend=backend)
    assert a1.item() == 0.0
    a1, _, _ = K.exgrpo_advantages(torch.tensor([[1.0]]), torch.tensor([[True]]), eps=0.0, backend=backend)
    assert a1.item() == 0.0, "a group of one with eps = 0 is 0, not 0/0"


def test_bonus_ranks_full_above_partial(backend):
    """Pooled over the question, a correct full-dialogue answer outranks a correct partial one;
    normalised per scenario, the bonus is invisible (docs/method.md step 5's argument)."""
    outcome = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    is_full = torch.tensor([[True, True, True, True, False, False, False, False]])   # P_full .5 > P_part .25
    a, t, f = K.exgrpo_advantages(outcome, is_full, backend=backend)
    assert f.item()
    assert a[0, 0] > a[0, 4] > 0, "bonus: correct full > correct partial"
    a0, _, _ = K.exgrpo_advantages(outcome, is_full, delta=0.0, backend=backend)
    assert torch.isclose(a0[0, 0], a0[0, 4]), "without the bonus both correct answers tie"
    a_s, _, _ = K.exgrpo_advantages(outcome, is_full, group_by="scenario", backend=backend)
    a_s0, _, _ = K.exgrpo_advantages(outcome, is_full, group_by="scenario", delta=0.0, backend=backend)
    torch.testing.assert_close(a_s, a_s0)


def test_nu_raises_the_bar(backend):
    outcome = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    is_full = torch.tensor([[True, True, True, False, False, False]])                 # 2/3 vs 1/3
    assert K.exgrpo_advantages(outcome, is_full, nu=1.9, backend=backend)[2].item()
    assert not K.exgrpo_advantages(outcome, is_full, nu=2.0, backend=backend)[2].item()


def test_hand_computed_values():
    outcome = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    is_full = torch.tensor([[True, True, False, False]])                              # .5 vs .5: no bonus
    a, t, f = K.exgrpo_advantages(outcome, is_full, eps=0.0)
    # mean .5, Bessel std sqrt(1/3)
    expected = torch.tensor([[1, -1, 1, -1]]) * 0.5 / (1 / 3) ** 0.5
    torch.testing.assert_close(a, expected.float())
    assert not f.item()
