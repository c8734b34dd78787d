"""Model behaviour: Phi parity, omni-attention, KV-cache decoding, samplers vs scorers."""
import json
import math

import pytest
import torch

import model as M
import sampling as S

V, OFF, K, MASK = 64, 40, 20, 60  # ids 40..59 are image codes, 60 is <mask>
BOI, EOI = 3, 61


def tiny(image_causal=False, seed=0):
    torch.manual_seed(seed)
    cfg = M.Config(vocab_size=V, n_layer=2, n_head=2, n_embd=32, n_inner=64, image_offset=OFF,
                   codebook_size=K, mask_id=MASK, pad_id=0, boi_id=BOI, eoi_id=EOI, image_causal=image_causal)
    m = M.UnifiedModel(cfg).eval()
    for p in m.parameters():  # non-trivial biases and norms so parity tests can fail
        p.data.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("qk", [False, True])
def test_phi_parity(tmp_path, qk):
    from transformers import PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    hf_cfg = PhiConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128, qk_layernorm=qk)
    hf = PhiForCausalLM(hf_cfg).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = M.from_pretrained(str(tmp_path)).eval()
    assert ours.cfg.qk_norm == qk and hasattr(ours.layers[1].self_attn, "k_layernorm") == qk
    idx = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours.logits(idx)
    assert (ref - got).abs().max().item() < 1e-4


def test_qk_norm_config_and_file_must_agree(tmp_path):
    from transformers import PhiConfig, PhiForCausalLM
    cfg = PhiConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=64, qk_layernorm=True)
    PhiForCausalLM(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "qk_layernorm": False}))
    with pytest.raises(ValueError, match="hold per-head q/k LayerNorm.*says qk_layernorm false"):
        M.from_pretrained(str(tmp_path))
    cfg.qk_layernorm = False
    PhiForCausalLM(cfg).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="lack per-head q/k LayerNorm.*says qk_layernorm true"):
        M.from_pretrained(str(tmp_path / "plain"), config={**conf, "qk_layernorm": True})


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.from_pretrained(str(tmp_path / "nope"))


def test_omni_mask_bidirectional_inside_image_only():
    m = tiny()
    idx = torch.tensor([[1, OFF + 2, BOI, OFF, OFF + 3, MASK, EOI, 5, BOI, OFF + 1, OFF + 4]])
    mask = m.omni_mask(idx, torch.ones_like(idx, dtype=torch.bool))[0, 0]
    assert mask[3, 5] and mask[5, 3]          # inside the first image block: both ways
    assert not mask[2, 3] and not mask[1, 3]  # <boi> and text cannot look ahead into the image
    assert not mask[5, 6] and mask[6, 5]      # <eoi> closes the block: causal again
    assert not mask[4, 9] and mask[9, 4]      # a later block is separate: causal between blocks
    assert mask[9, 10] and mask[10, 9]
    causal = tiny(image_causal=True).omni_mask(idx, torch.ones_like(idx, dtype=torch.bool))[0, 0]
    assert not causal[3, 5] and causal[5, 3]


def test_image_codes_in_text_stay_causal():
    """Object words use image-code ids; outside <boi>..<eoi> they must be causal like the text sampler."""
    m = tiny()
    idx = torch.tensor([[1, 5, OFF + 2, OFF + 3, 6]])
    mask = m.omni_mask(idx, torch.ones_like(idx, dtype=torch.bool))[0, 0]
    assert torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril())


def test_image_tokens_see_later_image_tokens():
    m = tiny()
    a = torch.tensor([[1, 2, BOI, OFF, OFF + 3, OFF + 5]])
    b = a.clone()
    b[0, 5] = OFF + 9
    with torch.no_grad():
        ha, hb = m.hidden(a), m.hidden(b)
    assert (ha[0, 3] - hb[0, 3]).abs().max() > 1e-6  # bidirectional: an earlier image token changes
    assert (ha[0, 2] - hb[0, 2]).abs().max() == 0     # <boi> and text before the image do not


def test_left_padding_does_not_change_outputs():
    m = tiny()
    seq = [1, 5, 6, OFF + 2, OFF + 4, 7]
    ids, valid = S.pad_left([seq, [3] * 9], 0)
    with torch.no_grad():
        padded = m.hidden(ids, valid)[0, -len(seq):]
        alone = m.hidden(torch.tensor([seq]))[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def full_recompute_greedy(m, prompt, n, allowed):
    seq, lps = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            h = m.hidden(torch.tensor([seq]))[:, -1]
            lp = S.subset_logprobs(m, h, allowed)
        j = lp.argmax(-1)
        lps.append(lp[0, j].item())
        seq.append(allowed[j].item())
    return seq[len(prompt):], lps


def test_kv_cache_greedy_equals_full_recomputation():
    m = tiny()
    allowed = torch.tensor([1, 2, *range(4, 30)])  # text never emits <boi> (id 3)
    prompts = [[1, 4, 5, 6, 7], [2, 8], [9, 8, 7, 6, 5, 4, 2]]
    toks, lps, valid = S.sample_text(m, prompts, 8, allowed, stop_ids=[], temperature=0)
    for i, p in enumerate(prompts):
        ref, ref_lp = full_recompute_greedy(m, p, 8, allowed)
        assert toks[i].tolist() == ref
        assert torch.allclose(lps[i], torch.tensor(ref_lp), atol=1e-5)
    assert valid.all()


def test_text_sampler_logprobs_match_scorer_and_stop():
    m = tiny()
    allowed = torch.tensor([1, 2, *range(4, 30)])
    prompts = [[1, 4, 5], [2, 6, 6, 6]]
    g = torch.Generator().manual_seed(3)
    toks, lps, valid = S.sample_text(m, prompts, 12, allowed, stop_ids=[7, 8, 9], temperature=1.3, generator=g)
    assert torch.all(toks[~valid] == 0)
    for i in range(2):  # after a stop token nothing more is valid
        stops = [t for t, tok in enumerate(toks[i].tolist()) if tok in (7, 8, 9)]
        if stops:
            assert not valid[i, stops[0] + 1:].any()
    seqs = [p + toks[i][valid[i]].tolist() for i, p in enumerate(prompts)]
    ids, v = S.pad_left(seqs, 0)
    tgt = torch.full_like(ids, -1)
    for i, p in enumerate(prompts):
        n = int(valid[i].sum())
        tgt[i, -n - 1:-1] = ids[i, -n:]
    with torch.no_grad():
        lp, _ = S.token_logprobs(m, m(ids, v), tgt, ids=allowed, temperature=1.3, chunk=5)
    for i in range(2):
        n = int(valid[i].sum())
        assert torch.allclose(lp[i, -n - 1:-1], lps[i][valid[i]], atol=1e-5)


@pytest.mark.parametrize("cfg_w", [0.0, 2.0])
def test_maskgit_codes_length_determinism_and_logprobs(cfg_w):
    m = tiny()
    cond = [[1, 4, 5, 3], [2, 6, 3]]
    uncond = [[1, 3], [1, 3]]

    def run(seed):
        return S.sample_maskgit(m, cond, uncond, 16, steps=5, cfg_w=cfg_w, temperature=1.0,
                                generator=torch.Generator().manual_seed(seed))
    a, b = run(0), run(0)
    assert a["codes"].shape == (2, 16)
    assert ((a["codes"] >= 0) & (a["codes"] < K)).all()      # only image codes, all committed
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["logprobs"], b["logprobs"])
    assert set(a["step_of"].unique().tolist()) == set(range(5))
    lp, sel, _ = S.maskgit_logprobs(m, cond, uncond, a["codes"], a["step_of"], list(range(5)), cfg_w, 1.0, chunk=7)
    assert sel.all()
    assert torch.allclose(lp, a["logprobs"], atol=1e-5)
    part, sel2, _ = S.maskgit_logprobs(m, cond, uncond, a["codes"], a["step_of"], [1, 3], cfg_w, 1.0)
    assert torch.equal(sel2, (a["step_of"] == 1) | (a["step_of"] == 3))
    assert torch.allclose(part[sel2], a["logprobs"][sel2], atol=1e-5)


def test_maskgit_preview_and_resume_equal_one_run():
    m = tiny()
    cond, uncond = [[1, 4, 5, 3]], [[1, 3]]
    full = S.sample_maskgit(m, cond, uncond, 16, 6, 1.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    part = S.sample_maskgit(m, cond, uncond, 16, 6, 1.5, generator=g, stop=2)
    assert (part["pred"] >= 0).all() and (part["codes"] < 0).any()  # preview is a full image
    done = S.sample_maskgit(m, cond, uncond, 16, 6, 1.5, generator=g, state=part)
    assert torch.equal(done["codes"], full["codes"])


def show_o_rule(N, T):
    """Tokens committed per step by Show-o's t2i_generate, restated here: mask_len = floor(N cos(pi/2 r))
    as a float32 tensor, clamped to [1, unknown - 1]; the returned sample fills what stays masked."""
    unknown, counts = N, []
    for step in range(T):
        ratio = torch.tensor(1.0 * (step + 1) / T)
        mask_len = (N * torch.cos(ratio * math.pi * 0.5)).floor()
        mask_len = max(1, min(unknown - 1, int(mask_len)))
        counts.append(unknown - mask_len)
        unknown = mask_len
    counts[-1] += unknown
    return counts


@pytest.mark.parametrize("N,T_", [(1024, 12), (1024, 18), (1024, 50), (256, 50), (64, 8)])
def test_showo_sampler_commits_as_show_o(N, T_):
    m = tiny()
    st = S.sample_maskgit(m, [[1, 4, 3]], [[1, 3]], N, T_, 2.0, generator=torch.Generator().manual_seed(0), sampler="showo")
    assert ((st["codes"] >= 0) & (st["codes"] < K)).all()  # every position filled at the end
    got = torch.bincount(st["step_of"][0], minlength=T_).tolist()
    assert got == show_o_rule(N, T_) == S.showo_commits(N, T_)
    if (N, T_) == (1024, 12):  # the plain float64 floor-difference schedule is not Show-o's here
        assert [S.keep_masked(s - 1, T_, N) - S.keep_masked(s, T_, N) if s else N - S.keep_masked(0, T_, N)
                for s in range(T_)] != got


def test_showo_sampler_is_seeded_untempered_and_compounds_its_temperature():
    m = tiny()
    cond, uncond = [[1, 4, 5, 3], [2, 6, 3]], [[1, 3], [1, 3]]

    def run(seed, temperature=1.0):
        return S.sample_maskgit(m, cond, uncond, 16, 6, 1.5, temperature, torch.Generator().manual_seed(seed), sampler="showo")
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["logprobs"], b["logprobs"])
    assert not torch.equal(a["codes"], c["codes"])
    # log-probs are those of the untempered CFG logits, whatever the (Gumbel) temperature
    for st in (a, run(0, temperature=3.0)):
        lp, sel, _ = S.maskgit_logprobs(m, cond, uncond, st["codes"], st["step_of"], list(range(6)), 1.5, 1.0)
        assert sel.all() and torch.allclose(lp, st["logprobs"], atol=1e-5)
    assert S.showo_choice_temperature(0, 50) == pytest.approx(0.98)
    assert S.showo_choice_temperature(9, 50) == pytest.approx(math.prod(1 - j / 50 for j in range(1, 11)))
    assert S.showo_choice_temperature(9, 50) == pytest.approx(0.31, abs=0.01) and S.showo_choice_temperature(26, 50) < 1e-3


@pytest.mark.parametrize("estimator", S.ESTIMATORS)
def test_image_estimators_score_their_positions(estimator):
    """A hand-built 5-token, 3-step trajectory scored at step 1: which positions, which tokens, what value."""
    m = tiny()
    codes, step_of = torch.tensor([[5, 7, 2, 9, 11]]), torch.tensor([[0, 1, 2, 1, 2]])
    draws = torch.tensor([[[5, 8, 3, 1, 0], [5, 7, 4, 9, 6], [5, 7, 2, 9, 11]]], dtype=torch.int32)
    commit_lp = torch.tensor([[-1.0, -2.0, -3.0, -2.9, -0.5]])
    lp, sel, _ = S.maskgit_logprobs(m, [[1, 4, 3]], [[1, 3]], codes, step_of, [1], estimator=estimator,
                                    draws=draws, commit_lp=commit_lp)
    with torch.no_grad():  # step 1's input: position 0 committed at step 0, the rest masked
        full = m.logits(torch.tensor([[1, 4, 3, OFF + 5, MASK, MASK, MASK, MASK]]))[0, 3:, OFF:OFF + K].log_softmax(-1)
    at = lambda j, t: full[j, t].item()
    if estimator == "commit":
        want = {1: at(1, 7), 3: at(3, 9)}
    elif estimator == "masked":
        want = {j: at(j, t) for j, t in zip(range(1, 5), [7, 4, 9, 6])}
    elif estimator == "all":
        want = {j: at(j, t) for j, t in enumerate([5, 7, 4, 9, 6])}
    else:  # re-masked positions 2 and 4: the mass below the step's lowest kept log-prob, -2.9
        below = lambda j: full[j][full[j] < -2.9].logsumexp(0).item()
        want = {1: at(1, 7), 2: below(2), 3: at(3, 9), 4: below(4)}
    assert sel[0].nonzero().flatten().tolist() == sorted(want)
    for j, v in want.items():
        assert lp[0, j].item() == pytest.approx(v, abs=1e-5)
    assert (lp[~sel] == 0).all()


@pytest.mark.parametrize("cfg_w", [0.0, 3.0])
def test_ar_image_logprobs_match_scorer(cfg_w):
    m = tiny(image_causal=True)
    cond, uncond = [[1, 4, 5, 3], [2, 3]], [[1, 3], [1, 3]]
    g = torch.Generator().manual_seed(0)
    part = S.sample_ar_image(m, cond, uncond, 12, cfg_w, 0.9, generator=g, stop=4)
    assert (part["codes"][:, :4] >= 0).all() and (part["codes"][:, 4:] < 0).all()
    st = S.sample_ar_image(m, cond, uncond, 12, cfg_w, 0.9, generator=g, state=part)
    assert ((st["codes"] >= 0) & (st["codes"] < K)).all()
    lp, _, _ = S.ar_image_logprobs(m, cond, uncond, st["codes"], cfg_w, 0.9, chunk=5)
    assert torch.allclose(lp, st["logprobs"], atol=1e-5)


def test_ar_sampling_needs_causal_images():
    with pytest.raises(ValueError, match="image_causal"):
        S.sample_ar_image(tiny(), [[1, 3]], [[1, 3]], 4)


def test_chunked_scoring_equals_full_with_gradients():
    m = tiny()
    idx = torch.randint(1, V, (3, 10))
    valid = torch.ones_like(idx, dtype=torch.bool)
    tgt = torch.randint(0, V, (3, 10))
    tgt[:, :3] = -1
    grads = []
    for chunk in (0, 4):
        m.zero_grad()
        lp, _ = S.token_logprobs(m, m(idx, valid), tgt, chunk=chunk)
        lp.sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        if chunk == 0:
            ref = lp.detach()
    assert torch.allclose(lp, ref, atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def tiny_layout(layout):
    """tiny() in nanosync's layout, or Show-o's (its <soi> sits in the image block, so it is not reused)."""
    m = tiny()
    m.cfg.layout, m.cfg.mmu_id = layout, 62
    return m


@pytest.mark.parametrize("layout,sampler", [("nanosync", "plain"), ("nanosync", "showo"), ("showo", "plain")])
def test_prompt_kv_reuse_equals_recompute(layout, sampler):
    """Prompt keys/values computed once: the same codes, draws and log-probs as recomputing every step,
    left padding and a DGS-style resume included; the scorer likewise, for every image estimator."""
    m = tiny_layout(layout)
    cond, uncond = [[1, 4, 5, 3], [2, 3], [1, 6, 7, 8, 9, 3]], [[1, 3]] * 3

    def run(reuse):
        g = torch.Generator().manual_seed(4)
        part = S.sample_maskgit(m, cond, uncond, 16, 5, 1.5, 1.0, g, stop=2, sampler=sampler, reuse_prompt=reuse)
        return S.sample_maskgit(m, cond, uncond, 16, 5, 1.5, 1.0, g, state=part, sampler=sampler, reuse_prompt=reuse)
    a, b = run(True), run(False)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["draws"], b["draws"])
    assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    for est in S.ESTIMATORS:
        out = [S.maskgit_logprobs(m, cond, uncond, a["codes"], a["step_of"], [0, 2, 4], 1.5, 1.0, estimator=est,
                                  draws=a["draws"], commit_lp=a["logprobs"], reuse_prompt=reuse) for reuse in (True, False)]
        assert torch.equal(out[0][1], out[1][1]), est
        assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and torch.allclose(out[0][2], out[1][2], atol=1e-5), est
    lp, sel, _ = S.maskgit_logprobs(m, cond, uncond, a["codes"], a["step_of"], list(range(5)), 1.5, 1.0)
    if sampler == "plain":  # the reused path's scorer still reads what its sampler stored
        assert sel.all() and torch.allclose(lp, a["logprobs"], atol=1e-5)


def test_answer_scoring_with_shared_prompts_equals_full_rows():
    """Text scoring with each distinct prompt run once (a group's rollouts share it), with and without
    gradient checkpointing (the prompt's blocks checkpointed one by one): the same hidden states at every
    valid answer position as full rows, and the same gradient; prompts with an image block included."""
    m = tiny()
    prompts = [[1, 4, BOI, OFF + 2, OFF + 5, EOI, 6]] * 3 + [[2, 7, 6]] * 2
    toks = torch.randint(1, 30, (5, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = []
    for reuse, m.grad_ckpt in ((True, True), (True, False), (False, False)):
        m.zero_grad()
        h = S.answer_hidden(m, prompts, toks, mask, 0, reuse_prompt=reuse)
        lp, _ = S.token_logprobs(m, h, torch.where(mask, toks, -1))
        lp.sum().backward()
        out.append((h[mask].detach(), [p.grad.clone() for p in m.parameters()]))
    for h, grads in out[:2]:
        assert torch.allclose(h, out[2][0], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, out[2][1]))


def test_text_sampler_prefills_each_distinct_prompt_once():
    m = tiny()
    prompts = [[1, 4, 5, 6]] * 3 + [[2, 7]] * 2 + [[1, 4, 5, 6]]
    allowed = torch.arange(1, 30)
    a, b = (S.sample_text(m, prompts, 6, allowed, [9], 1.0, generator=torch.Generator().manual_seed(1), reuse_prompt=r)
            for r in (True, False))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert torch.allclose(a[1], b[1], atol=1e-5)
