"""The reader rounds of the federation's label map (privtune_flwr.federated_reader)."""

import math

import numpy as np
import pytest
import torch

from privtune_flwr import federated_reader as fr
from privtune_flwr.federated_map import FitNoise, gaussian_sigma


def _plan(**kw):
    base = dict(rounds=3, steps=4, lr=0.01, clip=1.0, rank=2, classes=2, max_len=12)
    base.update(kw)
    return fr.ReaderPlan(**base)


def _synthetic(n=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    rows, ids = [], []
    for y in labels:
        length = int(torch.randint(3, 10, (1,), generator=g))
        x = torch.randn(length, d, generator=g)
        x[:, 0] += 2.0 * (2 * y - 1)  # the label lives in dimension 0
        t = torch.randint(2, 30, (length,), generator=g)
        t[0] = 0  # a special token first
        rows.append(x)
        ids.append(t)
    return rows, ids, labels


def test_the_written_out_reader_is_the_module():
    plan = _plan()
    torch.manual_seed(1)
    module = plan.reader().eval()
    weights = dict(module.named_parameters())
    f = torch.randn(4, plan.max_len, plan.rank)
    mask = torch.ones(4, plan.max_len, dtype=torch.long)
    mask[0, 5:] = 0
    mask[3, 1:] = 0
    with torch.no_grad():
        expected = module(f, mask)
        mine = torch.stack([fr.reader_logits(weights, f[i], mask[i]) for i in range(4)])
    assert torch.allclose(mine, expected, atol=1e-5)
    assert sorted(fr.reader_shapes(plan, 8)) == sorted([fr.WEIGHTS, *weights])


@pytest.mark.parametrize("epsilon,delta,rounds,steps", [(64.0, 1e-5, 8, 8), (8.0, 1e-6, 3, 5), (1.0, 1e-5, 1, 1),
                                                        (64.0, 1e-5, 0, 8)])
def test_the_fit_phase_composes_to_the_devices_floor(epsilon, delta, rounds, steps):
    """The statistics (one Gaussian mechanism, unit sensitivity after scaling) and the T reader
    steps (Gaussian mechanisms of sensitivity clip, sd multiplier x clip) together: the privacy loss
    of a composition of Gaussian mechanisms is the sum of independent N(m_i^2/2, m_i^2), and
    delta(eps) = E[(1 - e^(eps - L))+] is integrated numerically here; it must be the floor's delta."""
    plan = _plan(rounds=rounds, steps=steps)
    stats_sigma, multiplier = fr.split_budget(epsilon, delta, plan)
    assert stats_sigma == pytest.approx(FitNoise(epsilon, delta, 14.0, 32, 0.5 if rounds else 1.0).unit_sigma)
    shifts = [1 / stats_sigma] + ([1 / multiplier] * plan.total_steps if rounds else [])
    m2 = sum(m * m for m in shifts)
    sd = math.sqrt(m2)
    loss = np.linspace(m2 / 2 - 12 * sd, m2 / 2 + 12 * sd, 400_001)
    density = np.exp(-((loss - m2 / 2) ** 2) / (2 * m2)) / math.sqrt(2 * math.pi * m2)
    achieved = np.trapezoid(np.clip(1 - np.exp(epsilon - loss), 0, None) * density, loss)
    assert achieved == pytest.approx(delta, rel=1e-3)
    # the cloud that declares more steps gets noisier steps, not a weaker guarantee
    if rounds:
        _, more = fr.split_budget(epsilon, delta, _plan(rounds=rounds * 4, steps=steps))
        assert more == pytest.approx(2 * multiplier)
    assert fr.composed_mu(stats_sigma, multiplier, plan.total_steps) == pytest.approx(1 / gaussian_sigma(epsilon, delta))


def test_one_sentence_moves_the_clipped_sum_by_at_most_the_clip():
    rows, ids, labels = _synthetic(n=16)
    plan = _plan(clip=0.05)
    weights = {k: torch.from_numpy(v) for k, v in fr.initial_weights(plan, 8, 0).items()}
    rows[3] = rows[3] * 1e4  # one extreme sentence
    kw = dict(center=torch.zeros(8), scale=1.0, special_ids=[0, 1], plan=plan)
    full, share = fr.clipped_gradient_sum(weights, rows, ids, labels, **kw)
    assert share > 0.5
    for i in (0, 3, 15):
        rest = [j for j in range(len(rows)) if j != i]
        without, _ = fr.clipped_gradient_sum(weights, [rows[j] for j in rest], [ids[j] for j in rest],
                                             [labels[j] for j in rest], **kw)
        moved = math.sqrt(sum(float(((full[k] - without[k]) ** 2).sum()) for k in full))
        assert moved <= plan.clip * (1 + 1e-4)
        assert moved > 0.5 * plan.clip  # clipped sentences move it by about the clip, not by nothing


def test_the_noise_is_gaussian_at_its_sd(seeded_entropy):
    """The device's draw (a fresh key, its OS entropy replaced by a seeded stream so that the
    statistics are the same every run): sd multiplier x clip, checked with a chi-square
    interval on 40,000 draws and a normality test."""
    from scipy import stats

    zero = {"a": torch.zeros(200, 200)}
    from privtune_flwr.mechanism.noise_key import NoiseKey

    stream = NoiseKey.fresh().stream(b"t", [])
    noisy = fr.add_gaussian(zero, 0.7 * 1.5, lambda shape: torch.from_numpy(stream.numpy.standard_normal(shape)).float())
    x = noisy["a"].double().flatten().numpy()
    n = len(x)
    low, high = stats.chi2.ppf([0.0005, 0.9995], n)
    assert low <= (x ** 2).sum() / (0.7 * 1.5) ** 2 <= high
    assert stats.normaltest(x).pvalue > 1e-4


def test_no_gradient_sequence_moves_a_weight_past_the_bound():
    plan = _plan(steps=8, lr=0.01)
    bound = fr.step_bound(plan)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.ones(8, 1), -torch.ones(8, 1), torch.tensor([[1e-6]] * 7 + [[1e6]]),
                 torch.tensor([[1e6]] + [[1e-6]] * 7), torch.tensor([[(-1.0) ** t] for t in range(8)])]
    sequences += [torch.randn(8, 1, generator=g) * 10 ** float(torch.randint(-6, 6, (1,), generator=g)) for _ in range(200)]
    worst = 0.0
    for seq in sequences:
        w, m1, m2 = {"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {"w": torch.zeros(1)}
        for t in range(plan.steps):
            w, m1, m2 = fr.adam_step(w, m1, m2, {"w": seq[t]}, t + 1, plan.lr)
        worst = max(worst, float(w["w"].abs()))
    assert worst <= bound
    assert worst >= plan.lr * plan.steps * 0.999  # a constant gradient moves lr per step: the bound is not loose by much
    assert bound < 3 * plan.lr * plan.steps


def test_bad_changes_are_left_out_and_the_mean_goes_on():
    plan = _plan()
    shapes = fr.reader_shapes(plan, 8)
    bound = fr.step_bound(plan)
    good = {k: np.full(v, 0.5 * bound, dtype=np.float32) for k, v in shapes.items()}
    far = {k: v * 3 for k, v in good.items()}
    nan = {k: v.copy() for k, v in good.items()}
    nan[fr.WEIGHTS][0, 0] = np.nan
    shaped = {**good, fr.WEIGHTS: np.zeros((8, 3), dtype=np.float32)}
    missing = {k: v for k, v in good.items() if k != fr.WEIGHTS}
    mean, accepted, rejected = fr.mean_change([("a", good), ("b", far), ("c", nan), ("d", shaped), ("e", missing),
                                               ("f", {k: -v for k, v in good.items()})], shapes, bound)
    assert accepted == ["a", "f"] and [r[0] for r in rejected] == ["b", "c", "d", "e"]
    assert "at most" in rejected[0][1] and "non-finite" in rejected[1][1] and "(8, 2)" in rejected[2][1]
    assert all(float(v.abs().max()) == 0.0 for v in mean.values())
    assert fr.mean_change([("b", far)], shapes, bound)[0] is None


def test_private_rounds_find_the_label_direction_and_noise_costs_little_at_the_default_floor():
    """Synthetic tokens whose label lives in dimension 0: two devices, the reader rounds from a
    random start; the final W's span holds dimension 0 without noise and at the default floor."""
    plan = _plan(rounds=4, steps=6, lr=0.05, clip=1.0)
    shares = [_synthetic(n=60, seed=s) for s in (1, 2)]
    start = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(3)))[0]

    def run(multiplier):
        weights = {k: torch.from_numpy(v) for k, v in fr.initial_weights(plan, 8, 0).items()}
        weights[fr.WEIGHTS] = start.clone()
        g = torch.Generator().manual_seed(0)
        for _ in range(plan.rounds):
            changes = [fr.private_steps(weights, *share, center=torch.zeros(8), scale=1.0, special_ids=[0, 1], plan=plan,
                                        multiplier=multiplier, generator=g)[0] for share in shares]
            weights = {k: weights[k] + sum(c[k] for c in changes) / len(changes) for k in weights}
        basis, _ = torch.linalg.qr(weights[fr.WEIGHTS])
        return float(basis[0].norm())  # how much of dimension 0 the span holds (1 = all)

    _, multiplier = fr.split_budget(64.0, 1e-5, plan)
    before = float(start[0].norm())
    clean, noisy = run(0.0), run(multiplier)
    print(f"dimension 0 in the span: start {before:.3f}, no noise {clean:.3f}, default floor {noisy:.3f}")
    assert clean > 0.8 and noisy > 0.7 and before < 0.3  # measured 0.89-0.98 and 0.81 (1 and 2 threads)


def test_the_cloud_optimizer_releases_one_noisy_gradient_sum_a_round(seeded_entropy):
    """``fit-optimizer = "cloud"``: a device's round is one clipped gradient sum plus Gaussian noise
    of sd multiplier x clip from its own entropy (chi-square interval, normality test on the
    difference), and the budget counts one step a round, so the same floor buys less noise."""
    from scipy import stats

    rows, ids, labels = _synthetic(n=30)
    plan = _plan(rounds=5, steps=8, optimizer="cloud")
    assert plan.steps_per_round == 1 and plan.total_steps == 5 and fr.reader_record(plan) == "gradient"
    device = _plan(rounds=5, steps=8)
    assert device.total_steps == 40 and fr.reader_record(device) == "change"
    _, cloud_multiplier = fr.split_budget(64.0, 1e-5, plan)
    _, device_multiplier = fr.split_budget(64.0, 1e-5, device)
    assert cloud_multiplier == pytest.approx(device_multiplier / math.sqrt(8))
    weights = {k: torch.from_numpy(v) for k, v in fr.initial_weights(plan, 8, 0).items()}
    kw = dict(center=torch.zeros(8), scale=1.0, special_ids=[0, 1], plan=plan)
    exact, _ = fr.clipped_gradient_sum(weights, rows, ids, labels, **kw)
    noise = []
    for _ in range(200):
        noisy, metrics = fr.private_gradient(weights, rows, ids, labels, multiplier=cloud_multiplier, **kw)
        noise.append(torch.cat([(noisy[k] - exact[k]).double().flatten() for k in exact]))
    assert metrics["reader-steps"] == 1.0
    x = torch.cat(noise).numpy() / (cloud_multiplier * plan.clip)
    low, high = stats.chi2.ppf([0.0005, 0.9995], len(x))
    assert low <= (x ** 2).sum() <= high
    assert stats.normaltest(x).pvalue > 1e-4
    assert abs(float(np.corrcoef(noise[0].numpy(), noise[1].numpy())[0, 1])) < 0.05  # fresh noise each round


def test_the_cloud_sums_gradients_with_no_device_weighing_more_than_the_cap():
    plan = _plan(optimizer="cloud")
    shapes = fr.reader_shapes(plan, 8)
    g = np.random.default_rng(0)
    honest = [(f"d{i}", {k: g.standard_normal(v).astype(np.float32) for k, v in shapes.items()}) for i in range(9)]
    loud = ("loud", {k: v * 100 + 5 for k, v in honest[0][1].items()})
    nan = {k: v.copy() for k, v in honest[1][1].items()}
    nan[fr.WEIGHTS][0, 0] = np.inf
    bad = [("nan", nan), ("shaped", {**honest[2][1], fr.WEIGHTS: np.zeros((8, 3), np.float32)})]
    def norm(a):
        return math.sqrt(sum(float((torch.as_tensor(v).double() ** 2).sum()) for v in a.values()))

    # a spiky device: twice a typical norm, all of it in one coordinate
    spike = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    spike[fr.WEIGHTS][3, 1] = 2 * norm(honest[0][1])
    total, accepted, rejected, scaled = fr.summed_gradient(honest + [loud, ("spike", spike)] + bad, shapes)
    assert accepted == [n for n, _ in honest] + ["loud", "spike"] and [r[0] for r in rejected] == ["nan", "shaped"]
    assert scaled == ["loud", "spike"]  # the honest devices' sums are summed untouched
    median = float(np.median([norm(a) for _, a in honest + [loud, ("spike", spike)]]))
    honest_sum = {k: sum(torch.as_tensor(a[k]) for _, a in honest) for k in shapes}
    rest = {k: total[k] - honest_sum[k] for k in shapes}  # what the loud and the spiky device added
    assert norm(rest) <= 2 * fr.NORM_CAP * median
    assert norm(rest) > 0.5 * fr.NORM_CAP * median  # the loud device still counts, as a few typical ones
    # alone with the honest ones, the spike is clamped to COORD_CAP x the spread about the median
    spiked, _, _, scaled = fr.summed_gradient(honest + [("spike", spike)], shapes)
    assert scaled == ["spike"]
    stacked = torch.stack([torch.cat([torch.as_tensor(a[k]).flatten() for k in shapes])
                           for _, a in honest + [("spike", spike)]])
    centre = stacked.median(dim=0).values
    spread = float(torch.sqrt(((stacked - centre) ** 2).mean(1)).median())
    i = list(shapes).index(fr.WEIGHTS)
    offset = sum(math.prod(shapes[k]) for k in list(shapes)[:i]) + 3 * shapes[fr.WEIGHTS][1] + 1
    assert float(spiked[fr.WEIGHTS][3, 1] - honest_sum[fr.WEIGHTS][3, 1]) == pytest.approx(
        float(centre[offset]) + fr.COORD_CAP * spread, rel=1e-4)  # clamped to the bound, not dropped
    assert fr.COORD_CAP * spread < 0.2 * float(spike[fr.WEIGHTS][3, 1])
    assert fr.summed_gradient(bad, shapes)[0] is None
    # Adam on the sum: one step moves each weight by at most lr, whatever the sum's size
    weights = {k: torch.zeros(v) for k, v in shapes.items()}
    adam = fr.CloudAdam(weights, plan.lr)
    moved = adam.step(weights, {k: v * 1e6 for k, v in total.items()})
    assert max(float(v.abs().max()) for v in moved.values()) <= plan.lr * (1 + 1e-5)


def test_the_cloud_optimizer_finds_the_label_direction_where_each_device_alone_cannot():
    """Thirty devices of two sentences each, at the default floor: each device's own Adam steps
    follow its noise (its signal is two clipped sentences, its noise sd 1.4 x clip), while the
    cloud's Adam on the sum of one noisy gradient sum per device per round averages the noise
    over the federation. The same start, rounds and floor for both."""
    shares = [_synthetic(n=2, seed=s) for s in range(30)]
    start = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(3)))[0]

    def run(optimizer):
        plan = _plan(rounds=10, steps=6, lr=0.1, clip=1.0, optimizer=optimizer)
        _, multiplier = fr.split_budget(64.0, 1e-5, plan)
        weights = {k: torch.from_numpy(v) for k, v in fr.initial_weights(plan, 8, 0).items()}
        weights[fr.WEIGHTS] = start.clone()
        adam, g = fr.CloudAdam(weights, plan.lr), torch.Generator().manual_seed(0)
        kw = dict(center=torch.zeros(8), scale=1.0, special_ids=[0, 1], plan=plan, multiplier=multiplier, generator=g)
        for _ in range(plan.rounds):
            if optimizer == "device":
                changes = [fr.private_steps(weights, *share, **kw)[0] for share in shares]
                weights = {k: weights[k] + sum(c[k] for c in changes) / len(changes) for k in weights}
            else:
                summed = {k: sum(c[k] for c in [fr.private_gradient(weights, *share, **kw)[0] for share in shares])
                          for k in weights}
                weights = adam.step(weights, summed)
        basis, _ = torch.linalg.qr(weights[fr.WEIGHTS])
        return float(basis[0].norm())

    device, cloud = run("device"), run("cloud")
    print(f"dimension 0 in the span after 10 rounds: start {float(start[0].norm()):.3f}, "
          f"devices' own steps {device:.3f}, the cloud's steps {cloud:.3f}")
    assert cloud > 0.65 and cloud > device + 0.1  # measured: start 0.237, devices 0.568, cloud 0.730
