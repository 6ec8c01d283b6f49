"""Rollouts, token in and token out: the trained ids are the sampled ids, turn by turn, and the log-probs
the trainer computes for them are the sampler's own, at the sampling temperature."""
from types import SimpleNamespace

import pytest
import torch

from exgrpo import step as S
from exgrpo.batching import micro_batches, sequence_logprobs
from exgrpo.dialogues import load_probe_set, turn_segments
from exgrpo.distributed import SINGLE
from exgrpo.models import init_student
from exgrpo.policy import Policy
from exgrpo.rollout import HFEngine, TextEngine, run_dialogues


def cfg(**kw):
    base = dict(seed=0, questions_per_step=2, group_size=2, k_probes=3, partial_probes=None, delta=0.5, nu=1.0,
                bonus=True, scale="group",
                group_by="question", aux_coef=0.1, eps_low=0.2, eps_high=0.2, beta=0.04, temperature=1.0,
                micro_batch_tokens=512, packed=True)
    return SimpleNamespace(**{**base, **kw})


class Recording:
    """An engine wrapper that keeps every prompt it was given and every sample it returned."""

    def __init__(self, engine):
        self.engine, self.tok, self.calls = engine, engine.tok, []

    def sample(self, prompts, conversations):
        out = self.engine.sample(prompts, conversations)
        self.calls.append((prompts, out))
        return out


@pytest.fixture(scope="module")
def student(tiny_student):
    model, tok, dev = init_student(tiny_student)
    return model, tok, dev


def roll(student, probe_dir, temperature, max_new_tokens=10, step=0, **kw):
    model, tok, _ = student
    c = cfg(temperature=temperature, **kw)
    items = load_probe_set(probe_dir)
    plan = S.plan_step(items, step, S.begin_step(c.seed, step, SINGLE), c, SINGLE)
    eng = Recording(HFEngine(model, tok, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=64))
    outs = S.rollout(eng, plan)
    return c, plan, eng, outs


def test_trained_ids_are_exactly_the_sampled_ids(student, probe_dir):
    model, tok, dev = student
    c, plan, eng, outs = roll(student, probe_dir, 1.0)
    # replay the engine's calls: turn t of dialogue d was sampled from outs[d].ids up to that point
    n_turns = [len(t.turns) for t in plan.trajectories]
    turn_of = {d: 0 for d in range(len(outs))}
    for prompts, samples in eng.calls:
        live = [d for d in range(len(outs)) if turn_of[d] < n_turns[d]]
        assert len(live) == len(prompts) == len(samples)
        for d, p, s in zip(live, prompts, samples):
            r = outs[d]
            assert r.ids[: len(p)] == p, "the prompt is the dialogue's ids so far"
            assert r.ids[len(p): len(p) + len(s.ids)] == s.ids, "the sampled ids follow it unchanged"
            assert all(r.sampled[len(p): len(p) + len(s.ids)]) and not any(r.sampled[: len(p)][-1:])
            turn_of[d] += 1
    # every trajectory: the sampled positions hold exactly the concatenation of its samples, nothing else
    per_dialogue = {d: [] for d in range(len(outs))}
    for _, samples in eng.calls:
        live = [d for d in range(len(outs)) if len(per_dialogue[d]) < n_turns[d]]
        for d, s in zip(live, samples):
            per_dialogue[d].append(s.ids)
    adv = S.advantages(S.reward(plan, outs), c)
    seqs = S.sequences(plan, outs, adv, tok, c)
    for d, r in enumerate(outs):
        sampled = [i for i, m in zip(r.ids, r.sampled) if m]
        assert sampled == [i for ids in per_dialogue[d] for i in ids]
        assert seqs[d].ids == r.ids and seqs[d].policy == r.sampled
    # ... and the micro-batches train those ids: every policy target is a sampled id, in order
    mbs = micro_batches(seqs[: len(outs)], c.micro_batch_tokens, tok.pad_token_id, dev)
    for mb in mbs:
        for i, (row, col) in zip(mb.index, mb.starts):
            n = len(seqs[i].ids)
            want = [t for t, m in zip(seqs[i].ids[1:], seqs[i].policy[1:]) if m]
            got = mb.targets[row, col:col + n - 1][mb.mask[row, col:col + n - 1]].tolist()
            assert got == want
    # the point of the exercise: decoding and re-encoding would not have given the same ids
    changed = [ids for ids in (s.ids for _, samples in eng.calls for s in samples)
               if tok(tok.decode(ids), add_special_tokens=False).input_ids != ids]
    assert changed, "this tokenizer round-trips every sample: the test would not catch re-tokenisation"


def test_trainer_logprobs_are_the_samplers_at_its_temperature(student, probe_dir):
    """At T = 0.7 the trainer's log-probs of the sampled tokens (one forward over the whole dialogue, packed
    micro-batches) match the sampler's (KV-cached decoding, logits / T) to fp32 rounding; at T = 1 they do not."""
    model, tok, dev = student
    c, plan, eng, outs = roll(student, probe_dir, 0.7, step=1)
    adv = S.advantages(S.reward(plan, outs), c)
    seqs = S.sequences(plan, outs, adv, tok, c)[: len(outs)]
    policy = Policy(model, pad_id=tok.pad_token_id)
    mbs = micro_batches(seqs, c.micro_batch_tokens, tok.pad_token_id, dev)
    model.eval()
    sampler, at_t, at_1 = [], [], []
    for s, lp7, lp1 in zip(seqs, sequence_logprobs(policy, mbs, seqs, temperature=0.7),
                           sequence_logprobs(policy, mbs, seqs, temperature=1.0)):
        pos = [j for j in range(1, len(s.ids)) if s.policy[j]]          # position j is predicted at j - 1
        sampler += [s.rollout_logp[j] for j in pos]
        at_t += [lp7[j - 1].item() for j in pos]
        at_1 += [lp1[j - 1].item() for j in pos]
    sampler, at_t, at_1 = map(torch.tensor, (sampler, at_t, at_1))
    assert sampler.numel() > 100 and (sampler < 0).all()
    gap = (at_t - sampler).abs().max().item()
    # fp32 on both sides, |logp| ~ log V ~ 7: 1e-4 is ~100 ulps of the logits, far below any modelling error
    assert gap < 1e-4, f"trainer vs sampler log-probs at T=0.7: max abs diff {gap:.2e}"
    assert (at_1 - sampler).abs().mean().item() > 0.05, "T = 1 must not match a T = 0.7 sampler"

    # the step unit's own path: old and reference log-probs at the sampling temperature, ratio 1 in the loss
    batch = S.prepare(policy, seqs, c, SINGLE, dev, loss=S.loss_spec(c), old=True)
    for s in seqs:
        pos = [j for j in range(1, len(s.ids)) if s.policy[j]]
        old = torch.tensor([s.old_logp[j - 1].item() for j in pos])
        ref = torch.tensor([s.ref_logp[j - 1].item() for j in pos])
        roll_lp = torch.tensor([s.rollout_logp[j] for j in pos])
        assert (old - roll_lp).abs().max() < 1e-4 and (ref - roll_lp).abs().max() < 1e-4
    from exgrpo.batching import loss_and_backward
    m = loss_and_backward(policy, batch.mbs, seqs, eps_low=0.2, eps_high=0.2, beta=0.04, aux_coef=0.0,
                          temperature=0.7, need_grad=False)
    assert m["ratio"] == pytest.approx(1.0, abs=1e-5) and m["kl"] == pytest.approx(0.0, abs=1e-6)
    model.train()


def test_segments_and_text_engines(student, probe_dir):
    """turn_segments: the template's text between the turns; a scripted text engine's replies are tokenised
    once each and end with the end-of-turn id, which the next segment then does not repeat."""
    _, tok, _ = student
    item = load_probe_set(probe_dir)[0]
    turns = [{"role": "user", "content": p.question} for p in item.probes[:2]] + [{"role": "user", "content": "Q?"}]
    segs = turn_segments(tok, turns)
    assert len(segs) == 4 and tok.decode(segs[-1]).startswith("<end_of_turn>")

    class Scripted:
        def generate(self, convs):
            return [f"reply {len(c)}" for c in convs]

    (r,) = run_dialogues(TextEngine(Scripted(), tok), [turns])
    assert r.replies == ["reply 1", "reply 3", "reply 5"] and r.logprobs is None
    text = tok.decode(r.ids)
    assert text.count("<end_of_turn>") == 2 * len(turns), "one end-of-turn per turn, not two"
    rendered = tok.apply_chat_template([m for t, rep in zip(turns, r.replies)
                                        for m in (t, {"role": "assistant", "content": rep})], tokenize=False)
    assert text == rendered


def test_sampler_ignores_the_checkpoints_sampling_settings(tiny_student, probe_dir):
    """A checkpoint's generation_config may ship repetition_penalty, min_p, top_k, no_repeat_ngram_size: the
    engine neutralises them, so what it samples (and records) is softmax(logits / T), the distribution the
    trainer's log-probs are of."""
    model, tok, dev = init_student(tiny_student)
    gc = model.generation_config
    gc.repetition_penalty, gc.min_p, gc.top_k, gc.no_repeat_ngram_size, gc.typical_p = 1.3, 0.05, 5, 2, 0.9
    c, plan, eng, outs = roll((model, tok, dev), probe_dir, 0.7, step=2)
    seqs = S.sequences(plan, outs, S.advantages(S.reward(plan, outs), c), tok, c)[: len(outs)]
    mbs = micro_batches(seqs, c.micro_batch_tokens, tok.pad_token_id, dev)
    model.eval()
    gaps = []
    for s, lp in zip(seqs, sequence_logprobs(Policy(model, pad_id=tok.pad_token_id), mbs, seqs, temperature=0.7)):
        gaps += [abs(lp[j - 1].item() - s.rollout_logp[j]) for j in range(1, len(s.ids)) if s.policy[j]]
    assert len(gaps) > 100 and max(gaps) < 1e-4, f"max gap {max(gaps):.2e}"


def test_end_of_turn_is_the_templates_marker_even_when_eos_is_not(tiny_student):
    """Gemma-it: eos is <eos>, the template closes a turn with <end_of_turn>. Both stop a sampled turn; a
    scripted reply ends with the template's marker, which then is not repeated."""
    import copy

    from exgrpo.rollout import turn_end_ids
    model, tok, _ = init_student(tiny_student)
    it_tok = copy.deepcopy(tok)
    it_tok.eos_token = "<eos>"
    eot, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<eos>")
    assert eot != eos
    model.generation_config.eos_token_id = [eos, eot]
    assert turn_end_ids(it_tok, model) == [eot, eos]
    assert set(HFEngine(model, it_tok, max_new_tokens=4).stop) == {eot, eos}

    class Scripted:
        def generate(self, convs):
            return ["ok"] * len(convs)

    turns = [{"role": "user", "content": "a?"}, {"role": "user", "content": "b?"}]
    (r,) = run_dialogues(TextEngine(Scripted(), it_tok), [turns])
    rendered = it_tok.apply_chat_template([m for t in turns for m in (t, {"role": "assistant", "content": "ok"})],
                                          tokenize=False)
    assert it_tok.decode(r.ids) == rendered and eos not in r.ids
