"""Sampling: settings, logit processing, draft verification, and invariant I2 (exact sampling).

What is tested
- I2 (docs/design.md §4): TiDAR sampling (draft lengths 2, 3, 4; beta = 1) of a tiny random-weight model
  with a 6-token vocabulary gives continuations of length 4 distributed exactly as AR sampling
  of the same weights. The exact AR distribution of all 6**4 continuations is enumerated with
  the model's own causal forward; thousands of engine samples (one batch, one seed per row)
  are compared with it by a chi-square goodness-of-fit test. Preconditions make the test
  meaningful: the diffusion proposals are far from p (total variation of "accept every draft"
  against AR), drafts are both accepted and rejected, and top-k / top-p boundaries are not
  within round-off of a tie. Power: the same test, same sample size, rejects two wrong
  samplers patched into the engine (the authors' worker, which replaces the first rejected
  draft by a sample of p instead of the residual, and one that accepts every draft).
  The same test covers a draft length that changes between steps (`set_draft_len`, as the
  server adapts it to the batch): proposals are cut, or padded with point-mass proposals.
- `probabilities` against an independent float64 implementation of temperature, top-k and
  top-p (Hugging Face TopPLogitsWarper semantics) and against transformers' own warpers.
- `verify_greedy` on hand cases; `verify_sampled`: p == q accepts everything, a draft with
  p(d) = 0 is always rejected and never comes back as the replacement, and the committed
  token at one position is distributed as p (chi-square), as is the bonus token.
- `SamplingParams` validation (each bad value raises SamplingError naming the setting) and
  seeding (same seed, same output, whatever the batch; different seeds, different output).

False-alarm rates
Every goodness-of-fit test of a correct sampler uses significance ALPHA = 1e-3. There are
K = 8 such tests (4 engine cases, 4 in test_verify_sampled_*_distribution), so a correct
implementation fails this file by chance with probability at most K * ALPHA = 0.8 %
(Bonferroni). All random draws use fixed seeds, so a given build passes or fails
deterministically; the bound is the chance that an arbitrary correct change of the numerics
(which reshuffles the samples) trips a test. The power checks assert p < ALPHA for the wrong
samplers; their observed p-values are many orders of magnitude below that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from tidar.runtime import sampling as sampling_module
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel
from tidar.runtime.sampling import (SamplingBatch, SamplingError, SamplingParams, accept_greedy, gumbel_noise,
                                    seed_key, verify_residual)
from tidar.train.checkpoint import init_random_weights, tiny_config

from oracles import Verdict, probabilities, sample, verify_greedy, verify_sampled


ALPHA = 1e-3
"""Significance of every goodness-of-fit test (false-alarm rate per test)."""
VOCAB = 6  # ids 0 (eos), 1 (pad), 2 (mask), 3..5
PROMPT = [3, 4, 1]
CONTINUATION = 4  # tokens per sampled continuation: 6**4 = 1296 cells
ENGINE_SAMPLES = 4000  # rows per engine case (one batch)
VERIFY_DRAWS = 12_000  # single-position speculative steps per verify_sampled check


@pytest.fixture(scope="module")
def model() -> TiDARModel:
    """A one-layer Llama-family TiDAR model with 6 tokens; weights large enough that the AR and
    diffusion distributions are peaked and far apart."""
    config = tiny_config("llama", VOCAB, block_size=4, num_hidden_layers=1)
    model = TiDARModel(config).eval()
    init_random_weights(model, seed=5, std=0.8)
    return model


# ---------------------------------------------------------------------------- helpers
def chi_square_pvalue(observed: Counter, expected: dict, impossible_ok: bool = False) -> float:
    """Chi-square goodness of fit of `observed` counts against the `expected` probabilities of
    every cell. Cells with probability 0 must never be observed: asserted, or with
    `impossible_ok` (power checks of wrong samplers) a p-value of 0. Cells whose expected
    count is below 5 are pooled into one cell (if that pool is itself below 5 it joins the
    smallest remaining cell), the usual validity condition of the chi-square approximation."""
    total = sum(observed.values())
    impossible = {c: n for c, n in observed.items() if expected.get(c, 0.0) == 0.0 and n}
    if impossible and impossible_ok:
        return 0.0
    assert not impossible, f"outcomes of probability 0 were drawn: {dict(list(impossible.items())[:5])}"
    cells = sorted((c for c in expected if expected[c] > 0.0), key=lambda c: expected[c], reverse=True)
    exp = np.array([expected[c] * total for c in cells])
    obs = np.array([observed.get(c, 0) for c in cells], dtype=float)
    big = exp >= 5.0
    exp_cells, obs_cells = list(exp[big]), list(obs[big])
    if (~big).any():
        pooled_exp, pooled_obs = exp[~big].sum(), obs[~big].sum()
        if pooled_exp >= 5.0 or not exp_cells:
            exp_cells.append(pooled_exp)
            obs_cells.append(pooled_obs)
        else:
            exp_cells[-1] += pooled_exp
            obs_cells[-1] += pooled_obs
    assert len(exp_cells) >= 2, "too few cells for a chi-square test"
    exp_cells = np.array(exp_cells)
    exp_cells *= sum(obs_cells) / exp_cells.sum()  # remove float round-off of the total
    return float(stats.chisquare(obs_cells, exp_cells).pvalue)


@torch.no_grad()
def ar_distribution(model: TiDARModel, prompt: list[int], length: int, params: SamplingParams):
    """Exact distribution {continuation: probability} of AR sampling with `params`, by
    enumerating every prefix with the model's causal forward; also the processed logits of
    every enumerated position (for the tie-margin check)."""
    dist = {(): 1.0}
    all_logits = []
    for _ in range(length):
        prefixes = list(dist)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        logits = model(ids, Layout.autoregressive(ids.shape[1]))[:, -1]
        all_logits.append(logits)
        probs = probabilities(logits, params).double()
        probs /= probs.sum(-1, keepdim=True)  # multinomial normalizes too; drops float32 round-off
        dist = {s + (t,): dist[s] * float(probs[r, t]) for r, s in enumerate(prefixes) for t in range(VOCAB)}
    assert math.isclose(sum(dist.values()), 1.0, abs_tol=1e-9)
    return dist, torch.cat(all_logits)


@torch.no_grad()
def accept_all_distribution(model: TiDARModel, prompt: list[int], draft_len: int, params: SamplingParams):
    """Exact distribution of the first `draft_len` tokens if every draft were accepted: d_0 from
    AR at the prompt's end, d_1..d_{b-1} from the prefill masks' diffusion distributions q."""
    ids = torch.tensor([prompt + [model.config.mask_token_id] * draft_len])
    logits = model(ids, Layout.prefill(len(prompt), draft_len))[0]
    rows = probabilities(torch.cat([logits[len(prompt) - 1: len(prompt)],
                                    logits[len(prompt) + 1: len(prompt) + draft_len]]), params).double()
    rows /= rows.sum(-1, keepdim=True)
    return {seq: math.prod(float(rows[i][t]) for i, t in enumerate(seq))
            for seq in itertools.product(range(VOCAB), repeat=draft_len)}


def marginal(dist: dict, length: int) -> dict:
    out: dict = {}
    for seq, p in dist.items():
        out[seq[:length]] = out.get(seq[:length], 0.0) + p
    return out


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def assert_no_near_ties(logits: torch.Tensor, params: SamplingParams, margin: float = 1e-4) -> None:
    """The top-k cut and the top-p cut of every row are far from a tie, so round-off differences
    between the enumeration and the engine (cached KV, other batch shapes) cannot move them."""
    scaled = logits.double() / params.temperature
    ordered = scaled.sort(dim=-1, descending=True).values
    k = params.top_k
    if 0 < k < logits.shape[-1]:
        assert float((ordered[:, k - 1] - ordered[:, k]).min()) > margin
        ordered = ordered[:, :k]
    if params.top_p < 1.0:
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)[:, :-1]
        assert float((cumulative - params.top_p).abs().min()) > margin


def engine_samples(model: TiDARModel, params: SamplingParams, draft_len: int, rows: int, seed_base: int,
                   mechanism: str = "coupled", draft_blocks: int | None = None):
    """`rows` continuations from one batched `generate`. "coupled": row i seeded with seed_base + i
    (seeded rows verify by coupling); "residual": unseeded rows (residual speculative sampling),
    their noise seeds drawn from torch's generator seeded with seed_base."""
    engine = DecodeEngine(TorchBackend(model), draft_len=draft_len, beta=1.0, draft_blocks=draft_blocks)
    if mechanism == "residual":
        torch.manual_seed(seed_base)
    requests = [Request(PROMPT, CONTINUATION, eos_ids=(),
                        sampling=dataclasses.replace(params, seed=seed_base + i if mechanism == "coupled" else None))
                for i in range(rows)]
    results = engine.generate(requests)
    assert [len(r.token_ids) for r in results] == [CONTINUATION] * rows
    accepted = sum(r.stats.accepted_tokens for r in results)
    proposed = sum(r.stats.draft_tokens for r in results)
    steps = sum(r.stats.forward_passes - 1 for r in results)
    return Counter(tuple(r.token_ids) for r in results), accepted, proposed, steps


def worker_verify(proposals, proposal_probs, target_probs, generator) -> Verdict:
    """WRONG on purpose (the authors' worker): stops at the first rejection and replaces the draft
    by a sample of p instead of the residual normalize(max(0, p - q))."""
    n = proposals.shape[0]
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    for i in range(n):
        token = int(proposals[i])
        if uniforms[i] * float(proposal_probs[i, token]) < float(target_probs[i, token]):
            continue
        return Verdict(i, int(sample(target_probs[i], generator)))
    return Verdict(n, int(sample(target_probs[n], generator)))


def position_blind_noise(keys, positions, vocab):
    """WRONG on purpose: the same noise at every position of a row (keyed by the seed alone), so
    the tokens of one continuation are not independent draws."""
    return gumbel_noise(keys, torch.zeros_like(positions), vocab)


def accept_all(proposal_tokens, choices, proposal_counts=None):
    """WRONG on purpose: accepts every draft."""
    n = proposal_tokens.shape[1]
    return torch.full_like(proposal_tokens[:, 0] if n else choices[:, 0], n), choices[:, -1]


# ---------------------------------------------------------------------------- I2
I2_CASES = {
    "t1.0-b2": (SamplingParams(temperature=1.0), 2, 10_000),
    "t1.0-b4": (SamplingParams(temperature=1.0), 4, 20_000),
    "t0.7-topk4-topp0.9-b3": (SamplingParams(temperature=0.7, top_k=4, top_p=0.9), 3, 30_000),
}


@pytest.mark.parametrize("mechanism", ["coupled", "residual"])
@pytest.mark.parametrize("case", list(I2_CASES))
def test_i2_tidar_sampling_matches_exact_ar_distribution(model, case, mechanism):
    """I2: continuations sampled by TiDAR (beta = 1) follow the exact AR distribution, for seeded
    rows (coupling) and unseeded rows (residual speculative sampling) alike (chi-square, false
    alarm ALPHA = 1e-3 per case)."""
    params, draft_len, seed_base = I2_CASES[case]
    exact, logits = ar_distribution(model, PROMPT, CONTINUATION, params)
    assert_no_near_ties(logits, params)
    # Power precondition: drafting from q without verification would be far off.
    naive = accept_all_distribution(model, PROMPT, draft_len, params)
    tv = total_variation(naive, marginal(exact, draft_len))
    assert tv > 0.3, f"proposals too close to p for a meaningful test (TV {tv:.3f})"

    counts, accepted, proposed, _ = engine_samples(model, params, draft_len, ENGINE_SAMPLES, seed_base, mechanism)
    assert 0 < accepted < proposed, "both the accept and the residual path must be exercised"
    pvalue = chi_square_pvalue(counts, exact)
    print(f"\nI2 {case} {mechanism}: TV(accept-all, AR) = {tv:.3f}, acceptance {accepted / proposed:.3f}, p = {pvalue:.3g}")
    assert pvalue > ALPHA, f"TiDAR samples do not follow the AR distribution (p = {pvalue:.3g})"


@pytest.mark.parametrize("mechanism", ["coupled", "residual"])
def test_i2_holds_with_k_of_b_blocks(model, mechanism):
    """I2 with k = 1 < b = 4 mask blocks (docs/design.md §3.4): after a step that accepted a
    proposal the next proposals are block 1's later masks, fewer of them, the rest padding that
    is never accepted (and for residual rows, the token after the last real proposal is a bonus
    draw from p); still the exact AR distribution."""
    params = SamplingParams(temperature=1.0)
    exact, logits = ar_distribution(model, PROMPT, CONTINUATION, params)
    assert_no_near_ties(logits, params)
    counts, accepted, proposed, steps = engine_samples(model, params, 4, ENGINE_SAMPLES, 60_000, mechanism,
                                                       draft_blocks=1)
    assert 0 < accepted < proposed < 3 * steps  # fewer than b - 1 proposals in some steps: the k < b path ran
    pvalue = chi_square_pvalue(counts, exact)
    print(f"\nI2 k-of-b {mechanism}: acceptance {accepted / proposed:.3f}, p = {pvalue:.3g}")
    assert pvalue > ALPHA, f"samples do not follow the AR distribution with k < b (p = {pvalue:.3g})"


def test_i2_holds_when_the_draft_length_changes_between_steps(model):
    """I2 with the draft length changed before every step (growing pads proposals with point
    masses, shrinking cuts them), half the rows seeded (coupling), half not (residual): still the
    exact AR distribution."""
    params = SamplingParams(temperature=1.0)
    exact, logits = ar_distribution(model, PROMPT, CONTINUATION, params)
    assert_no_near_ties(logits, params)
    engine = DecodeEngine(TorchBackend(model), draft_len=2)
    torch.manual_seed(50_000)
    requests = [Request(PROMPT, CONTINUATION, sampling=dataclasses.replace(params, seed=50_000 + i if i % 2 else None),
                        eos_ids=()) for i in range(ENGINE_SAMPLES)]
    results = [delta.result for delta in engine.add(requests) if delta.finished]
    for draft_len in itertools.cycle((4, 1, 3, 0, 4, 2)):
        if not engine.rows:
            break
        engine.set_draft_len(draft_len)
        results += [delta.result for delta in engine.step() if delta.finished]
    assert len(results) == ENGINE_SAMPLES and all(len(r.token_ids) == CONTINUATION for r in results)
    accepted, proposed = sum(r.stats.accepted_tokens for r in results), sum(r.stats.draft_tokens for r in results)
    assert 0 < accepted < proposed
    pvalue = chi_square_pvalue(Counter(tuple(r.token_ids) for r in results), exact)
    print(f"\nI2 with changing draft lengths: acceptance {accepted / proposed:.3f}, p = {pvalue:.3g}")
    assert pvalue > ALPHA, f"samples do not follow the AR distribution when the draft length changes (p = {pvalue:.3g})"


def target_not_residual(p, q):
    """WRONG on purpose (the authors' worker rule): after a rejection, sample p instead of
    normalize(max(0, p - q))."""
    return p


@pytest.mark.parametrize("name,wrong,rows,mechanism", [
    ("gumbel_noise", position_blind_noise, ENGINE_SAMPLES, "coupled"),
    ("accept_greedy", accept_all, ENGINE_SAMPLES // 4, "coupled"),
    ("residual_distribution", target_not_residual, ENGINE_SAMPLES, "residual")],
    ids=["position-blind-noise", "accept-all", "no-residual"])
def test_i2_test_rejects_wrong_samplers(model, monkeypatch, name, wrong, rows, mechanism):
    """Power check: the I2 test (same model, case t1.0-b4; the same sample size for the subtle
    bugs, a quarter of it for the blatant one) rejects a sampler that is not exact."""
    params, draft_len, _ = I2_CASES["t1.0-b4"]
    exact, _ = ar_distribution(model, PROMPT, CONTINUATION, params)
    monkeypatch.setattr(sampling_module, name, wrong)
    counts, _, _, _ = engine_samples(model, params, draft_len, rows, seed_base=40_000, mechanism=mechanism)
    pvalue = chi_square_pvalue(counts, exact, impossible_ok=True)
    print(f"\nI2 power, {wrong.__name__}: p = {pvalue:.3g}")
    assert pvalue < ALPHA, f"the I2 test did not detect {wrong.__name__} (p = {pvalue:.3g})"


# ---------------------------------------------------------------------------- probabilities
def reference_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Plain float64 temperature, then top-k, then top-p (keep the smallest set of most likely
    tokens whose cumulative probability reaches top_p; at least one), one row at a time."""
    out = np.zeros_like(logits, dtype=np.float64)
    for index in np.ndindex(logits.shape[:-1]):
        x = logits[index].astype(np.float64) / temperature
        if 0 < top_k < x.shape[0]:
            kth = np.sort(x)[::-1][top_k - 1]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if top_p < 1.0:
            keep = np.zeros_like(p, dtype=bool)
            mass = 0.0
            for token in np.argsort(-p, kind="stable"):
                keep[token] = True
                mass += p[token]
                if mass >= top_p:
                    break
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        out[index] = p
    return out


PROCESSING_CASES = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.6, 0, 1.0), (1.0, 3, 1.0), (1.0, 1, 1.0), (1.0, 20, 1.0), (1.0, 500, 1.0),
    (1.0, 0, 0.5), (0.8, 0, 0.9), (1.3, 0, 0.99), (0.5, 5, 0.6), (2.0, 8, 0.8), (1.0, 0, 1e-6), (1.0, 4, 1e-6),
]


@pytest.mark.parametrize("temperature,top_k,top_p", PROCESSING_CASES)
def test_probabilities_match_reference(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(7)
    logits = 2.0 * torch.randn(4, 3, 20, generator=generator)  # continuous: no ties
    got = probabilities(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    want = reference_probabilities(logits.numpy(), temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    np.testing.assert_array_equal(got.numpy() > 0, want > 0)  # the same tokens survive
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-6)


def test_probabilities_extremes():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 16, generator=generator)
    argmax_one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 16).float()
    tiny_p = probabilities(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert torch.equal(tiny_p, argmax_one_hot)  # top_p -> 0 keeps the argmax alone
    assert torch.equal(probabilities(logits, SamplingParams(temperature=0.5, top_k=1)), argmax_one_hot)
    everything = probabilities(logits, SamplingParams(temperature=0.9, top_p=1.0))
    torch.testing.assert_close(everything, torch.softmax(logits / 0.9, -1))
    assert bool((everything > 0).all())
    # Greedy settings: the one-hot argmax (not NaN from dividing by a zero temperature).
    assert torch.equal(probabilities(logits, SamplingParams()), argmax_one_hot)
    # Low-precision logits are processed in float32.
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        probs = probabilities(logits.to(dtype), SamplingParams(temperature=1.0, top_p=0.8))
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(50))


@pytest.mark.parametrize("temperature,top_k,top_p", PROCESSING_CASES)
def test_probabilities_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation import logits_process

    generator = torch.Generator().manual_seed(11)
    logits = 2.0 * torch.randn(12, 20, generator=generator)
    scores = logits.clone()
    input_ids = torch.zeros(12, 1, dtype=torch.long)
    scores = logits_process.TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_k:
        scores = logits_process.TopKLogitsWarper(top_k)(input_ids, scores)
    if top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(top_p)(input_ids, scores)
    got = probabilities(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(got, torch.softmax(scores, -1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- verify_greedy
def one_hot_logits(argmaxes: list[int], vocab: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(argmaxes), vocab, generator=generator)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


@pytest.mark.parametrize("proposals,argmaxes,accepted,next_token", [
    ([5, 3], [5, 3, 1], 2, 1),  # all accepted: the bonus token comes from the last row
    ([5, 4], [5, 3, 1], 1, 3),  # first mismatch at 1: correction = argmax of row 1
    ([0, 3], [5, 3, 1], 0, 5),  # mismatch at 0; the later match does not count
    ([6, 2, 7], [6, 2, 0, 4], 2, 0),
    ([], [7], 0, 7),  # no proposals (draft length 1): the AR choice
])
def test_verify_greedy_hand_cases(proposals, argmaxes, accepted, next_token):
    verdict = verify_greedy(torch.tensor(proposals, dtype=torch.long), one_hot_logits(argmaxes))
    assert (verdict.accepted, verdict.next_token) == (accepted, next_token)
    assert isinstance(verdict.accepted, int) and isinstance(verdict.next_token, int)


def test_padding_past_a_rows_proposal_count_is_never_accepted():
    """k < b (docs/design.md §3.4): slots past `counts` are padding. Greedy/seeded acceptance stops
    there even where the pad equals the choice; residual acceptance too, and the token after the
    last real proposal is a bonus draw from p (not from the residual of the pad's q). Here p is
    uniform over {5, 6} and every q a point mass on 5 (the pad): the residual would never give
    5, a bonus draw gives it half the time."""
    rows, n, vocab = 400, 3, 8
    proposals = torch.full((rows, n), 5)
    choices = torch.full((rows, n + 1), 5)
    counts = torch.tensor([0, 1, 2, 3]).repeat(rows // 4)
    accepted, next_token = accept_greedy(proposals, choices, counts)
    assert torch.equal(accepted, counts) and (next_token == 5).all()
    p = torch.zeros(rows, n + 1, vocab)
    p[..., 5] = p[..., 6] = 0.5
    q = torch.nn.functional.one_hot(torch.full((rows, n), 5), vocab).float()
    keys = torch.tensor([seed_key(s) for s in range(rows)], dtype=torch.long)
    positions = torch.arange(10, 10 + n + 1).expand(rows, -1)
    accepted, next_token = verify_residual(proposals, q, p, positions, keys, torch.zeros(rows, dtype=torch.long))
    assert (accepted == 0).all()
    share = float((next_token == 5).float().mean())
    assert 0.4 < share < 0.6, share  # a bonus draw from p; the residual max(0, p - q) never gives 5
    accepted, _ = verify_residual(proposals, q, p, positions, keys, torch.full((rows,), 2))
    assert (accepted <= 2).all() and (accepted == 2).any()


def test_accept_greedy_equals_verify_greedy_row_by_row():
    """The batched acceptance of the decode step against the per-row oracle `verify_greedy`, on
    random batches where every acceptance count occurs."""
    generator = torch.Generator().manual_seed(5)
    for n in (0, 1, 3, 7):
        choices = torch.randint(0, 4, (64, n + 1), generator=generator)
        keep = torch.rand(64, n, generator=generator) < 0.7  # proposals equal to the choice, mostly
        proposals = torch.where(keep, choices[:, :n], torch.randint(0, 4, (64, n), generator=generator))
        accepted, next_token = accept_greedy(proposals, choices)
        for r in range(64):
            verdict = verify_greedy(proposals[r], one_hot_logits(choices[r].tolist()))
            assert (int(accepted[r]), int(next_token[r])) == (verdict.accepted, verdict.next_token)
        if n:
            assert set(accepted.tolist()) == set(range(n + 1))


def test_gumbel_noise_is_a_pure_function_of_key_position_and_token():
    """Same (key, position, token), same value, whatever else is in the call; another key or
    position, other values; values are standard Gumbel (mean 0.5772, sd pi/sqrt(6)) and the
    argmax over tokens is uniform (chi-square, ALPHA)."""
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2 ** 64 - 1)])
    positions = torch.tensor([[5, 6, 7], [5, 6, 7], [0, 1, 2 ** 31 - 1]])
    noise = gumbel_noise(keys, positions, 1000)
    alone = gumbel_noise(keys[1:2], positions[1:2, 1:2], 1000)
    assert torch.equal(alone[0, 0], noise[1, 1])
    assert not torch.equal(noise[0, 0], noise[1, 0]) and not torch.equal(noise[0, 0], noise[0, 1])
    assert abs(float(noise.mean()) - 0.5772) < 0.03 and abs(float(noise.std()) - math.pi / math.sqrt(6)) < 0.03
    winners = gumbel_noise(torch.tensor([seed_key(s) for s in range(6000)]), torch.zeros(6000, 1, dtype=torch.long),
                           6).argmax(-1).flatten()
    counts = Counter(winners.tolist())
    assert chi_square_pvalue(counts, {t: 1 / 6 for t in range(6)}) > ALPHA
    assert seed_key(3) == seed_key(3) != seed_key(4)


def test_choose_is_argmax_for_greedy_rows_and_follows_each_rows_settings():
    """`SamplingBatch.choose`: greedy rows take the argmax; a sampled row never picks a token its
    top-k / top-p drops, and its pick depends only on its own seed and position."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 50, generator=generator)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3, seed=1),
              SamplingParams(temperature=2.0, top_p=0.3, seed=1)]
    batch = SamplingBatch.of(params, [0, 1, 1], "cpu")
    positions = torch.arange(5).repeat(3, 1) + 10
    picks = batch.choose(logits, positions)
    assert torch.equal(picks[0], logits[0].argmax(-1))
    for r in (1, 2):
        allowed = probabilities(logits[r], params[r]) > 0
        assert bool(allowed.gather(-1, picks[r, :, None]).all())
        solo = SamplingBatch.of([params[r]], [1], "cpu").choose(logits[r:r + 1], positions[r:r + 1])
        assert torch.equal(solo[0], picks[r])


# ---------------------------------------------------------------------------- verify_sampled
def random_distribution(generator: torch.Generator, shape, scale: float = 2.0, zeros: int = 0) -> torch.Tensor:
    """Softmax of random logits; the `zeros` smallest entries of each row set to probability 0."""
    probs = torch.softmax(scale * torch.randn(*shape, generator=generator), -1)
    if zeros:
        smallest = probs.topk(zeros, dim=-1, largest=False).indices
        probs = probs.scatter(-1, smallest, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def test_verify_sampled_accepts_everything_when_p_equals_q():
    generator = torch.Generator().manual_seed(1)
    for trial in range(300):
        n = 1 + trial % 5
        p = random_distribution(generator, (n + 1, 10), zeros=3 * (trial % 2))
        proposals = sample(p[:n], generator)
        verdict = verify_sampled(proposals, p[:n].clone(), p, generator)
        assert verdict.accepted == n
        assert p[n, verdict.next_token] > 0


def test_verify_sampled_rejects_drafts_that_p_excludes():
    generator = torch.Generator().manual_seed(2)
    vocab = 10
    for trial in range(300):
        bad = trial % vocab
        p = random_distribution(generator, (3, vocab))
        p[1, bad] = 0.0
        p[1] /= p[1].sum()
        q = random_distribution(generator, (2, vocab))
        q[0] = p[0]  # the first draft is always accepted
        first = int(sample(q[0], generator))
        verdict = verify_sampled(torch.tensor([first, bad]), q, p, generator)
        assert verdict.accepted == 1, "a draft of probability 0 under p was accepted"
        assert verdict.next_token != bad, "the replacement is a token of probability 0 under p"
        assert p[1, verdict.next_token] > 0


def first_position_counts(verify, p: torch.Tensor, q: torch.Tensor, bonus: torch.Tensor, draws: int, seed: int):
    """Outcome of one speculative step with a single draft d ~ q: counts of the committed token
    at that position (d if accepted, else the replacement) and of the bonus token after an
    accepted draft."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.stack([p, bonus])
    proposal_probs = q[None]
    first, bonus_tokens = Counter(), Counter()
    for _ in range(draws):
        proposals = sample(proposal_probs, generator)
        verdict = verify(proposals, proposal_probs, target, generator)
        if verdict.accepted:
            first[int(proposals[0])] += 1
            bonus_tokens[verdict.next_token] += 1
        else:
            first[verdict.next_token] += 1
    return first, bonus_tokens


def as_cells(probs: torch.Tensor) -> dict:
    return {t: float(v) for t, v in enumerate(probs.double())}


VERIFY_PAIRS = {
    # p and q with different supports: p excludes 3 and 4 (always rejected), q excludes 1 (only
    # reachable through the residual).
    "hand": (torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0]), torch.tensor([0.1, 0.0, 0.3, 0.4, 0.2, 0.0])),
    "random": (random_distribution(torch.Generator().manual_seed(5), (6,)),
               random_distribution(torch.Generator().manual_seed(6), (6,))),
}


@pytest.mark.parametrize("pair", list(VERIFY_PAIRS))
def test_verify_sampled_first_position_distribution(pair):
    """The committed token at a verified position is distributed as p, and the bonus token after
    an accepted draft as the bonus row (two chi-square tests, ALPHA = 1e-3 each)."""
    p, q = VERIFY_PAIRS[pair]
    bonus = random_distribution(torch.Generator().manual_seed(9), (6,), zeros=2)
    first, bonus_tokens = first_position_counts(verify_sampled, p, q, bonus, draws=VERIFY_DRAWS, seed=100)
    p_first, p_bonus = chi_square_pvalue(first, as_cells(p)), chi_square_pvalue(bonus_tokens, as_cells(bonus))
    print(f"\nverify_sampled {pair}: p(first) = {p_first:.3g}, p(bonus) = {p_bonus:.3g}")
    assert p_first > ALPHA and p_bonus > ALPHA
    # Power: the worker's shortcut (replacement drawn from p) is detected with the same draws.
    wrong, _ = first_position_counts(worker_verify, p, q, bonus, draws=VERIFY_DRAWS, seed=100)
    p_wrong = chi_square_pvalue(wrong, as_cells(p))
    print(f"verify_sampled {pair}, worker-no-residual: p = {p_wrong:.3g}")
    assert p_wrong < ALPHA


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize("setting,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -float("inf")),
    ("temperature", -0.5), ("temperature", "1.0"), ("temperature", True), ("temperature", None),
    ("top_p", 0.0), ("top_p", -0.2), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", float("inf")),
    ("top_p", "0.9"), ("top_p", True),
    ("top_k", -1), ("top_k", 2.5), ("top_k", 3.0), ("top_k", "3"), ("top_k", True),
    ("seed", -1), ("seed", 2 ** 64), ("seed", 1.5), ("seed", "7"), ("seed", True),
])
def test_sampling_params_reject_bad_values(setting, value):
    with pytest.raises(SamplingError, match=setting):
        SamplingParams(**{setting: value})
    assert issubclass(SamplingError, ValueError)


def test_sampling_params_accept_edge_values():
    for params in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(temperature=1e-3, top_p=1),
                   SamplingParams(temperature=5, top_k=0, top_p=1e-9, seed=0),
                   SamplingParams(temperature=1.0, top_k=10_000, seed=2 ** 64 - 1)):
        assert params.greedy == (params.temperature == 0)


def test_engine_seeding_is_deterministic_and_batch_independent(model):
    """Same seed -> same tokens, alone or among other rows; different seeds -> different tokens;
    greedy ignores the seed."""
    engine = DecodeEngine(TorchBackend(model), draft_len=3)

    def run(params_list, max_new_tokens=12):
        return [r.token_ids for r in engine.generate(
            [Request(PROMPT, max_new_tokens, sampling=params, eos_ids=()) for params in params_list])]

    sampled = [SamplingParams(temperature=1.0, top_p=0.95, seed=s) for s in range(8)]
    batch = run(sampled)
    assert run(sampled) == batch
    assert run([sampled[5]]) == [batch[5]]
    other = SamplingParams(temperature=0.3, seed=99)
    assert run([sampled[5], other, sampled[2]]) == [batch[5], run([other])[0], batch[2]]
    assert len({tuple(t) for t in batch}) > 1, "different seeds gave identical continuations"

    greedy = run([SamplingParams(seed=s) for s in (0, 1, 2)] + [SamplingParams()])
    assert all(tokens == greedy[0] for tokens in greedy)
