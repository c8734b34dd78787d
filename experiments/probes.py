"""
What the claims suite measures in-process on a checkpoint, beside the train.py runs it drives:

  held_out       held-out metrics with any CFG weight of the drawings (RL samples without CFG, evaluation with it)
  preview_corr   the within-prompt correlation of the DGS preview score with the final reward, at every
                 preview step 1 .. T-1: DGS can only pick better groups when the preview predicts the reward
  grad_noise     the variance of the policy-gradient estimate of one batch, with DGS on and off at the same
                 number of kept rollouts, and the distance between the mean gradients of the two samplers

The variance is measured directly: split a batch of P prompt groups into two halves of P/2 groups; their
gradients g1, g2 are independent estimates of the same expectation, the batch's estimate is (g1 + g2) / 2, and
E ||g1 - g2||^2 / 4 = trace Var((g1 + g2) / 2), the variance of the batch's gradient estimate (split_half_variance).
Only the clipped policy-gradient term is differentiated (no KL, no replay); advantages are those of the whole
batch, as in training. Used by experiments/ablate.py; no command of its own.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dgs  # noqa: E402
import flags  # noqa: E402
import train  # noqa: E402
from ckpt import load_checkpoint  # noqa: E402
from pretrain import world_and_tokenizer  # noqa: E402


def setup(train_argv):
    """(args, world, tokenizer) of train.py's flags, the world read (or written) as train.py would."""
    args = flags.get_args(train_argv)
    world, tok = world_and_tokenizer(args, None)
    train.COMPILE["on"] = False  # eager: the same numbers without a compile per process
    return args, world, tok


def load(path):
    return load_checkpoint(path)[0].eval()


def held_out(model, tok, world, args, cfg):
    """train.held_out_eval with the drawings sampled at CFG weight cfg (the held-out reward, like RL, uses --rl-cfg)."""
    return train.held_out_eval(model, tok, world, argparse.Namespace(**{**vars(args), "cfg": cfg}))


def preview_corr(model, tok, world, args, n_prompts):
    """{preview step k: within-prompt correlation of the preview after step k with the final reward}, every
    preview kept (tau = -inf) so the correlation is measured on unfiltered rollouts, from the same seeds at every k."""
    out = {}
    for k in range(1, args.steps):
        a = argparse.Namespace(**{**vars(args), "dgs_preview": k})
        batch, rolls, _ = train.collect(model, tok, world, a, 0, -1, dgs.DGSState(tau=-float("inf")), n_prompts)
        out[k] = dgs.diagnostics(batch, rolls, args.group)["total"].get("preview_corr", float("nan"))
    return out


def split_half_variance(loss_of, params, halves):
    """(||g1 - g2||^2 / 4, (g1 + g2) / 2) for the gradients g1, g2 of loss_of(half) over params: the trace of
    the covariance of the mean of two independent half-batch estimates, and that mean (flattened)."""
    g = []
    for h in halves:
        grads = torch.autograd.grad(loss_of(h), params, allow_unused=True)
        g.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(grads, params)]))
    return ((g[0] - g[1]) ** 2).sum().item() / 4, (g[0] + g[1]) / 2


def batch_gradient(model, tok, batch, A, args):
    """split_half_variance of the policy-gradient loss of one batch, halves of whole prompt groups."""
    P, G = batch.r_text.shape
    steps_sel = train.surprising_steps(batch.img, args.steps, args.update_steps)
    old = train.old_logprobs(model, tok, batch, args, steps_sel)
    rollouts = train.replace(batch, r_text=None, r_img=None, comps=None, preview=None)  # [P, G] fields: not row-sliced
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(groups):
        idx = [q * G + i for q in groups for i in range(G)]
        sub = dgs.rows(rollouts, idx)
        return train.policy_loss(model, model, tok, sub, {k: v[groups] for k, v in A.items()},
                                 {k: v[idx] for k, v in old.items()}, {}, args, steps_sel, first=True)[0]

    return split_half_variance(loss_of, params, [list(range(P // 2)), list(range(P // 2, 2 * (P // 2)))])


def grad_noise(model, tok, world, args, n_batches):
    """DGS on and off, n_batches fresh batches each of --rollouts kept rollouts: the mean variance of the
    batch's gradient estimate, the squared norm of the mean gradient, and the squared distance between the
    two samplers' mean gradients less what the noise of n_batches batches explains (> 0: a bias shows)."""
    out, means = {}, {}
    # the two samplers draw from different seeds (prompts and noise): with shared prompts their mean gradients
    # would share noise, and the distance between them would understate what independent noise explains
    for name, state, first in (("dgs_off", None, 10_000), ("dgs_on", dgs.DGSState(), 20_000)):
        var, gs = [], []
        for b in range(first, first + n_batches):
            batch, _, _ = train.collect(model, tok, world, args, 0, b, state, args.rollouts // args.group)
            v, g = batch_gradient(model, tok, batch, train.advantages(batch, args, b), args)
            var.append(v)
            gs.append(g)
        means[name] = torch.stack(gs).mean(0)
        out[name] = dict(var=sum(var) / len(var), mean_sq=means[name].pow(2).sum().item(), batches=n_batches)
    excess = (means["dgs_on"] - means["dgs_off"]).pow(2).sum().item() - (out["dgs_on"]["var"] + out["dgs_off"]["var"]) / n_batches
    out["bias_sq"] = excess  # E||mean_on - mean_off||^2 = ||bias||^2 + (var_on + var_off) / n
    out["cos"] = torch.nn.functional.cosine_similarity(means["dgs_on"], means["dgs_off"], dim=0).item()
    return out
