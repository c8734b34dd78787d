"""bench.py's fast paths equal their slow twins, and the benchmark runs end to end (nothing is timed here)."""
import json

import pytest
import torch

import bench
import model as M
import sampling as S
import train

SMALL = ["--device", "cpu", "--layers", "2", "--width", "32", "--heads", "2"]


def tiny():
    """A small model on the embedded world's vocabulary, weights spread so greedy choices have no near ties."""
    m, tok, n_img = bench.build(bench.get_args(SMALL), torch.device("cpu"))
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m, tok, n_img


def prompts(tok, n, length=7, seed=0):
    return bench.text_prompts(tok, n, length, torch.Generator().manual_seed(seed))


def test_cached_decode_equals_naive_decode():
    m, tok, _ = tiny()
    ps = prompts(tok, 3) + prompts(tok, 1, length=4, seed=1)  # unequal lengths: left padding too
    toks, lps, valid = S.sample_text(m, ps, 10, tok.text_ids(), [], temperature=0)
    ref, ref_lp = bench.naive_decode(m, ps, 10, tok.text_ids())
    assert valid.all() and torch.equal(toks, ref)
    assert torch.allclose(lps, ref_lp, atol=1e-5)


def test_sampled_decode_equals_naive_decode_for_one_generator():
    m, tok, _ = tiny()
    ps = prompts(tok, 4)
    a = S.sample_text(m, ps, 8, tok.text_ids(), [], temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = bench.naive_decode(m, ps, 8, tok.text_ids(), 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)


@pytest.mark.parametrize("cfg_w", [1.0, 3.0])
def test_batched_cfg_maskgit_equals_two_passes(cfg_w):
    m, tok, n_img = tiny()
    cond = [p + [tok.boi_id] for p in prompts(tok, 3)] + [p + [tok.boi_id] for p in prompts(tok, 1, 4, seed=2)]
    unc = [[tok.bos_id, tok.boi_id]] * 4
    a = S.sample_maskgit(m, cond, unc, n_img, 5, cfg_w, 1.0, torch.Generator().manual_seed(3))
    b = bench.maskgit_two_pass(m, cond, unc, n_img, 5, cfg_w, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["step_of"], b["step_of"])
    assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)


def test_two_pass_runs_conditional_and_unconditional_rows_apart():
    """Each of sample_maskgit's per-step forwards goes through the wrapper as two: rows [:B], then [B:]."""
    m, tok, n_img = tiny()
    calls = []
    hidden_after = m.hidden_after
    m.hidden_after = lambda past, pre_valid, idx, valid, causal=False: calls.append(len(idx)) or hidden_after(past, pre_valid, idx, valid, causal)
    cond = [p + [tok.boi_id] for p in prompts(tok, 3)]
    bench.maskgit_two_pass(m, cond, [tok.uncond_prompt()] * 3, n_img, 4, 2.0, 1.0, torch.Generator().manual_seed(0))
    assert calls == [3, 3] * 4


def test_prompt_recompute_swaps_sampling_functions_and_puts_them_back():
    before = {name: getattr(S, name) for name in bench.RECOMPUTED}
    with pytest.raises(RuntimeError), bench.prompt_recompute():
        for name, fn in before.items():
            assert getattr(S, name).func is fn and getattr(S, name).keywords == {"reuse_prompt": False}, name
        raise RuntimeError("an error inside the block")
    assert {name: getattr(S, name) for name in bench.RECOMPUTED} == before


def test_chunked_logprob_loss_equals_full_with_gradients():
    torch.manual_seed(0)
    head = M.UnifiedModel(M.Config(vocab_size=300, n_layer=0, n_head=1, n_embd=16, n_inner=16))
    h0, tgt, adv = torch.randn(3, 20, 16), torch.randint(300, (3, 20)), torch.randn(3, 1)
    tgt[0, :5] = -1  # ignored places
    out = []
    for chunk in (0, 7):
        head.zero_grad()
        h = h0.clone().requires_grad_()
        loss = bench.full_vs_chunked_loss(head, h, tgt, adv, chunk)
        loss.backward()
        out.append((loss.detach(), h.grad, head.lm_head.weight.grad.clone(), head.lm_head.bias.grad.clone()))
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-5)
    assert out[0][1].abs().sum() > 0


def test_bench_runs_end_to_end_and_writes_every_ratio(tmp_path):
    path = tmp_path / "sub" / "bench.json"
    compile_before, sampling_before = train.COMPILE["on"], {name: getattr(S, name) for name in bench.RECOMPUTED}
    bench.main(SMALL + ["--group", "2", "--prompts", "2", "--new-tokens", "4", "--prompt-len", "6", "--maskgit-steps", "2",
                        "--lp-vocab", "500", "--lp-tokens", "16", "--lp-batch", "2", "--lp-width", "8", "--chunk", "8",
                        "--reps", "1", "--compile", "0", "--out", str(path)])
    res = json.loads(path.read_text())
    assert train.COMPILE["on"] == compile_before  # the eager switch is put back
    assert {name: getattr(S, name) for name in bench.RECOMPUTED} == sampling_before
    assert set(res["ratios"]) == set(bench.TARGETS) and set(res["targets"]) == set(bench.TARGETS)
    for k, v in res["ratios"].items():
        assert (v is None) == (k in ("formulas_compiled_vs_eager", "rl_step_fast_vs_slow")), k
    assert res["decode_vs_naive"]["tokens_equal"] and res["decode_vs_hf_generate"]["tokens_equal"]
    assert res["cfg_batched_vs_two_pass"]["codes_equal"] and res["cfg_batched_vs_two_pass"]["max_lp_diff"] < 1e-5
    assert res["decode_vs_naive"]["max_lp_diff"] < 1e-5
    assert res["maskgit_kv_reuse_vs_recompute"]["codes_equal"] and res["maskgit_kv_reuse_vs_recompute"]["max_lp_diff"] < 1e-5
    k = "scorer_kv_reuse_vs_recompute"
    assert res[k]["max_lp_diff"] < 1e-5 and res[k]["max_grad_diff"] < 1e-5, k
    assert res["logprob"]["max_grad_diff"] < 1e-5
    for k in ("text_rollout", "image_rollout"):
        assert res[k]["peak_mb"] >= res[k]["baseline_mb"]
    assert res["text_rollout"]["tokens_per_s"] > 0 and res["image_rollout"]["rollouts_per_s"] > 0 and res["update"]["ms"] > 0
