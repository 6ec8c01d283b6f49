"""Packed micro-batches (several sequences in one row, position ids restarting per sequence, no padding) give
the loss and gradients that padded ones give, and both the truth: each sequence alone, in float64, through
the model's own logits and the reference loss. fp32 errors are bounded like the kernels' (2x what the same
per-sequence computation in eager fp32 is off), so the check holds on any CPU's BLAS."""
import pytest
import torch
from _helpers import assert_like_eager, propagated_error
from exgrpo.kernels import reference as R

from exgrpo.batching import Sequence, loss_and_backward, micro_batches, sequence_logprobs
from exgrpo.dialogues import POLICY, SFT, dialogue, load_probe_set, render
from exgrpo.models import load_model, load_tokenizer
from exgrpo.policy import Policy

LOSS = dict(eps_low=0.2, eps_high=0.28, beta=0.05, aux_coef=0.1)


@pytest.fixture(scope="module")
def batch(tiny_student, probe_dir):
    """Ten sequences of different lengths: Scenario-A-like dialogues whose student turns carry the policy
    loss (random advantages of both signs, off-policy old log-probs, a reference), and teacher-forced
    probe dialogues (the auxiliary SFT loss)."""
    tok = load_tokenizer(tiny_student)
    items = load_probe_set(probe_dir)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, it in enumerate(items[:5]):
        probes = list(it.probes[: 1 + i % 3])
        answers = [f"Answer {j}: {p.answer}." for j, p in enumerate(probes)]
        t = render(tok, dialogue(probes, answers, it.example, f"The answer is {i}.", answer_train=POLICY))
        seqs.append(Sequence(t.ids, t.policy, t.sft, advantage=float(torch.randn(1, generator=g))))
        t = render(tok, dialogue(probes, None, None, None, answer_train=SFT))
        seqs.append(Sequence(t.ids, t.policy, t.sft))
    truth_model = load_model(tiny_student, dtype=torch.float64)
    with torch.no_grad():
        lp = [alone_logprobs(truth_model, s) for s in seqs]
    for s, x in zip(seqs, lp):                                    # old / ref: the truth plus a drift that clips
        s.old_logp = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).float()
        s.ref_logp = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).float()
    return tok, seqs


def alone_logprobs(model, s: Sequence) -> torch.Tensor:
    """log p(token t+1 | tokens ≤ t) of one sequence alone, through the model's own [1, L, V] logits."""
    ids = torch.tensor([s.ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.to(torch.float64), -1).gather(1, ids[0, 1:, None])[:, 0]


def spec_loss(model, seqs, dtype):
    """The trainer's objective written out: every sequence alone at `dtype`, then one token-mean clipped
    loss + KL over all policy tokens and λ·mean NLL over all teacher-forced tokens (kernels/reference.py).
    -> (loss, [every parameter's gradient flattened], per-token log-probs, ∂loss/∂logp)."""
    model.zero_grad(set_to_none=True)
    lp = torch.cat([alone_logprobs(model, s) for s in seqs])[None]              # [1, ΣL-1]
    cat = lambda f: torch.cat([f(s) for s in seqs])[None]
    mask = cat(lambda s: torch.tensor(s.policy[1:]))
    sft = cat(lambda s: torch.tensor(s.sft[1:]))
    adv = cat(lambda s: torch.full((len(s.ids) - 1,), s.advantage, dtype=torch.float64))
    old, ref = cat(lambda s: s.old_logp.double()), cat(lambda s: s.ref_logp.double())
    lp_leaf = lp.detach().requires_grad_()
    loss, _ = R.policy_loss_ref(lp_leaf, old, ref, adv, mask, sft_mask=sft, reduction="token_mean", **LOSS)
    loss.backward()
    loss, _ = R.policy_loss_ref(lp, old, ref, adv, mask, sft_mask=sft, reduction="token_mean", **LOSS)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    return loss.detach().double(), grads, lp.detach()[0], lp_leaf.grad[0]


def ours(model, tok, seqs, packed, budget, one_row=False):
    model.zero_grad(set_to_none=True)
    mbs = micro_batches(seqs, budget, tok.pad_token_id, "cpu", packed=packed, one_row=one_row)
    m = loss_and_backward(Policy(model, pad_id=tok.pad_token_id), mbs, seqs, **LOSS)
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    return torch.tensor(m["loss"], dtype=torch.float64), grads, mbs


def test_packed_and_padded_micro_batches_match_the_truth(tiny_student, batch):
    tok, seqs = batch
    truth, g_truth, lp_truth, dloss = spec_loss(load_model(tiny_student, dtype=torch.float64), seqs, torch.float64)
    model = load_model(tiny_student)
    eager, g_eager, lp_eager, _ = spec_loss(model, seqs, torch.float32)
    from_logp = propagated_error(dloss, lp_eager, lp_truth)
    for layout, packed, one_row in (("one row", True, True), ("packed rows", True, False), ("padded", False, False)):
        for budget in (100_000, 300):                              # one micro-batch; several
            loss, grads, mbs = ours(model, tok, seqs, packed, budget, one_row)
            name = f"{layout}, {len(mbs)} micro-batches"
            assert_like_eager(loss, truth, eager, f"{name}: loss", propagated=from_logp)
            assert_like_eager(grads, g_truth, g_eager, f"{name}: parameter gradients")
            if budget == 300:
                assert len(mbs) > 1
            lens = lambda mb: [len(seqs[i].ids) for i in mb.index]
            if one_row:                                            # flash-attn's layout: no padding at all
                assert all(mb.input_ids.shape[0] == 1 and mb.attention is None for mb in mbs)
                assert sum(mb.input_ids.numel() for mb in mbs) == sum(len(s.ids) for s in seqs)
            elif packed:                                           # rows as wide as the longest: attention cost
                for mb in mbs:                                     # at most the padded layout's, fewer rows
                    assert mb.attention is None and mb.input_ids.shape[1] == max(lens(mb))
                    assert mb.input_ids.shape[0] <= len(mb.index)


def test_packed_rows_keep_sequences_apart(tiny_student, batch):
    """Each sequence's log-probs in a packed row are its log-probs alone; with the sequences attending
    across their boundaries (one row, positions running on) they visibly are not."""
    tok, seqs = batch
    model = load_model(tiny_student)
    policy = Policy(model, pad_id=tok.pad_token_id)
    mbs = micro_batches(seqs, 100_000, tok.pad_token_id, "cpu", packed=True, one_row=True)
    assert len(mbs) == 1 and len(mbs[0].index) == len(seqs)
    got = sequence_logprobs(policy, mbs, seqs)
    truth_model = load_model(tiny_student, dtype=torch.float64)
    for s, lp in zip(seqs, got):
        trained = torch.tensor(s.policy[1:]) | torch.tensor(s.sft[1:])
        truth, eager = alone_logprobs(truth_model, s), alone_logprobs(model, s)
        assert_like_eager(lp[trained], truth[trained], eager[trained], "packed log-probs")
    mb = mbs[0]
    mixed = policy(mb.input_ids, torch.ones_like(mb.input_ids), mb.targets, logprobs_only=True)
    k = max(range(len(mb.index)), key=lambda k: mb.starts[k][1])   # the sequence with the most before it
    last = seqs[mb.index[k]]
    r, c = mb.starts[k]
    trained = torch.tensor(last.policy[1:]) | torch.tensor(last.sft[1:])
    leak = (mixed[r, c:c + len(last.ids) - 1][trained] - got[mb.index[k]][trained]).abs().max().item()
    fp32 = (alone_logprobs(model, last) - alone_logprobs(truth_model, last))[trained].abs().max().item()
    assert leak > 100 * fp32, (f"attending across sequences changes the log-probs by {leak:.1e}, not far above fp32 "
                               f"rounding ({fp32:.1e}): this test would not see a leak")


def test_flex_attention_packs_one_row(tiny_student, batch):
    """flex_attention (torch's FlexAttention, block-sparse over a packed row) gives each sequence its log-probs
    alone, with every sequence in one row; it is compiled on first use (~15 s on the CPU machine)."""
    from transformers import AutoModelForCausalLM
    tok, seqs = batch
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student), attn_implementation="flex_attention")
    policy = Policy(model, pad_id=tok.pad_token_id)
    assert policy.one_row_packing
    mbs = micro_batches(seqs[:4], 100_000, tok.pad_token_id, "cpu", packed=True, one_row=policy.one_row_packing)
    assert len(mbs) == 1 and mbs[0].input_ids.shape[0] == 1
    got = sequence_logprobs(policy, mbs, seqs[:4])
    truth_model, eager_model = load_model(tiny_student, dtype=torch.float64), load_model(tiny_student)
    for s, lp in zip(seqs[:4], got):
        trained = torch.tensor(s.policy[1:]) | torch.tensor(s.sft[1:])
        assert_like_eager(lp[trained], alone_logprobs(truth_model, s)[trained],
                          alone_logprobs(eager_model, s)[trained], "flex packed log-probs")


def test_attention_choice():
    """auto: flash_attention_2 only on CUDA in bf16/fp16 with flash-attn installed, else sdpa; an explicit
    choice that cannot run says why."""
    import importlib.util

    from exgrpo.models import ModelError, attention_for
    assert attention_for("auto", torch.float32, "cpu") == "sdpa"
    assert attention_for("auto", torch.bfloat16, "cpu") == "sdpa"
    assert attention_for("eager", torch.float32, "cpu") == "eager"
    with pytest.raises(ModelError, match="attention must be one of"):
        attention_for("flash", torch.float32, "cpu")
    with pytest.raises(ModelError, match="flash"):
        attention_for("flash_attention_2", torch.float32, "cpu")
    if importlib.util.find_spec("flash_attn") is None:
        assert attention_for("auto", torch.bfloat16, "cuda") == "sdpa"
