"""
Held-out evaluation with UnifyBench-style metrics, on the concepts the model never trained on.

  python train.py --stage eval --ckpt out/base        # or any checkpoint folder / run folder

Understanding: recognition accuracy (weighted: the mean of the positive and negative accuracies, as
Yo'LLaVA reports it, so a constant "yes" or "no" scores 0.5 however unbalanced the questions), VQA accuracy, text-only QA accuracy
(greedy answers, exact match). Generation: the model first writes its reasoning, then draws
(MaskGIT or AR, with the run's CFG); identity (CLIP-I analogue: share of the concept's sprite drawn),
alignment (CLIP-T analogue: the request's placement), knowledge-driven score (0 / 0.5 / 1), and
reasoning accuracy (the stated fact is the right one).
"""
import torch

import data
import model as M

UNDERSTAND = ("recognition", "vqa", "textqa")
METRICS = ["recognition", "recognition_pos", "recognition_neg", "vqa", "textqa",
           "identity", "alignment", "knowledge", "reasoning"]


@torch.no_grad()
def answer(model, tok, prompts, max_new, temperature=0.0, generator=None):
    """Decode a text answer for each prompt; returns (strings, tokens, logprobs, valid)."""
    toks, lps, valid = M.sample_text(model, prompts, max_new, tok.text_ids(), [tok.eor_id],
                                     temperature=temperature, generator=generator)
    texts = [tok.decode(t[v & (t != tok.eor_id)]) for t, v in zip(toks, valid)]
    return texts, toks, lps, valid


@torch.no_grad()
def draw(model, tok, prompts, args, temperature, generator=None, stop=None, state=None):
    """Image codes for generation prompts (ending with <boi>), MaskGIT or AR, CFG rows batched."""
    uncond, n = [data.uncond_prompt(tok)] * len(prompts), tok.n_image_tokens
    if args.image_mode == "ar":
        return M.sample_ar_image(model, prompts, uncond, n, args.cfg, temperature, generator, stop, state)
    return M.sample_maskgit(model, prompts, uncond, n, args.steps, args.cfg, temperature, generator, state, stop,
                            sampler=args.maskgit_sampler)


def batches(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


@torch.no_grad()
def evaluate(model, tok, tasks, args):
    """Mean of every metric over the given tasks: greedy text; images sampled at --eval-temperature
    from a fixed seed (argmax MaskGIT commits background everywhere first and draws near-empty images)."""
    model.eval()
    scores = {k: [] for k in METRICS}
    und = [t for t in tasks if t.kind in UNDERSTAND]
    gen = [t for t in tasks if t.kind in ("gen", "kgen")]
    for chunk in batches(und, args.eval_batch):
        texts = answer(model, tok, [data.understanding_prompt(tok, t) for t in chunk], args.max_text)[0]
        for t, text in zip(chunk, texts):
            ok = data.answer_correct(t, text)
            if t.kind == "recognition":
                scores["recognition_neg" if t.answer == "no" else "recognition_pos"].append(ok)
            else:
                scores[t.kind].append(ok)
    for chunk in batches(gen, args.eval_batch):
        texts, toks, _, valid = answer(model, tok, [data.understanding_prompt(tok, t) for t in chunk], args.max_text)
        prompts = [data.generation_prompt(tok, t.concept, t.question, tok.encode(text)) for t, text in zip(chunk, texts)]
        g = torch.Generator(model.lm_head.weight.device).manual_seed(0)  # sampled, yet the same every call
        codes = draw(model, tok, prompts, args, args.eval_temperature, g)["codes"]
        for t, text, c in zip(chunk, texts, codes):
            scores["identity"].append(data.identity_score(t.concept, c))
            scores["alignment"].append(data.alignment_score(t, c))
            if t.kind == "kgen":
                scores["knowledge"].append(data.knowledge_score(t, c))
                scores["reasoning"].append(data.answer_correct(t, text))
    res = {k: (sum(v) / len(v) if v else float("nan")) for k, v in scores.items()}
    res["recognition"] = (res["recognition_pos"] + res["recognition_neg"]) / 2
    return res


def table(columns):
    """Markdown table: one row per metric, one column per named result dict."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in METRICS:
        lines.append(f"| {k} | " + " | ".join(f"{columns[n][k]:.3f}" for n in names) + " |")
    return "\n".join(lines)

