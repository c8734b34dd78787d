"""
Dynamic Group Scaling (DGS) for Sync-GRPO, and the group statistics that say whether GRPO can learn.

- `zero_variance_groups`, `learnability`, `diagnostics`: which groups carry no learning signal, and per
  reward component its mean, pass@1, pass@G and share of zero-variance groups (DGS tries to make them rare).
- `DGSState`, `update_tau`, `dgs_group`: the preview-and-reject sampler. Each rollout is
  stopped early, its preview is scored cheaply, and it is kept only if the score beats tau;
  tau adapts once per batch toward a target acceptance rate. The loop knows nothing about
  the model: it calls `start`, `score` and `finish` callbacks.
- `rows`, `cat_rows`: slicing a batch of rollouts into rows and joining rows again (train.collect's groups,
  and a DGS group's kept previews).

R is a [P, G] tensor: P prompts, G rollouts of the same prompt per row.
"""
from dataclasses import asdict, dataclass, fields, is_dataclass

import torch

import rewards

CAP_PER_G = 4  # previews per group at most (the released cap, 4 x G), before filling with the best


def zero_variance_groups(R):
    """[P] bool: True where every reward of the group is equal (zero advantage, zero gradient)."""
    # exact equality with the first reward, not std < tol: matches train.group_advantages' exact zeros
    return (R == R[:, :1]).all(dim=1)


def learnability(values, applies, success=1.0):
    """Can GRPO learn from one reward component? values, applies: [P, G] (applies marks the rollouts
    the component is defined for, e.g. knowledge only on knowledge requests). Over the groups where it
    applies: mean; pass@1 = share of rollouts with full credit (>= success); pass@G = share of groups
    with at least one; zero_var = share of groups whose values are all equal (they give no gradient).
    pass@G close to pass@1 with many zero-variance groups means nothing to reinforce."""
    groups = applies.all(dim=1)
    v = values[groups]
    if not len(v):
        return dict(mean=float("nan"), pass1=float("nan"), passG=float("nan"), zero_var=float("nan"), groups=0)
    hit = v >= success - 1e-6
    return dict(mean=v.mean().item(), pass1=hit.float().mean().item(), passG=hit.any(1).float().mean().item(),
                zero_var=zero_variance_groups(v).float().mean().item(), groups=len(v))


def within_group_corr(x, y):
    """Pearson correlation of x and y after removing each group's mean ([P, G] each): does the DGS
    preview score rank a prompt's rollouts as their final rewards do? (Across prompts, difficulty alone
    would correlate them.)"""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    den = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum().item() / den.item() if den > 0 else float("nan")


# ----------------------------------------------------------------------------- partial batches: a batch is joined from
# its groups, and a DGS group from single previews, so rollouts are sliced into rows and joined again

def rows(p, idx):
    """The rollouts idx of a partial batch, a train.Rollouts (lists and row tensors sliced alike, the drawing's too)."""
    if is_dataclass(p):
        return type(p)(**{f.name: rows(getattr(p, f.name), idx) for f in fields(p)})
    if isinstance(p, dict):
        return {k: rows(v, idx) for k, v in p.items()}
    if torch.is_tensor(p) and p.dim() > 0:
        return p[idx]
    return [p[i] for i in idx] if isinstance(p, list) else p


def cat_rows(parts):
    """The rows of several partial batches, in order (text lengths padded to the longest, with zeros)."""
    first = parts[0]
    if is_dataclass(first):
        return type(first)(**{f.name: cat_rows([getattr(q, f.name) for q in parts]) for f in fields(first)})
    if isinstance(first, dict):
        return {k: cat_rows([q[k] for q in parts]) for k in first}
    if torch.is_tensor(first) and first.dim() > 0:
        L = max(t.shape[-1] for t in parts) if first.dim() > 1 else None
        return torch.cat([t if L is None else torch.nn.functional.pad(t, (0, L - t.shape[-1])) for t in parts])
    return [x for q in parts for x in q] if isinstance(first, list) else first



@dataclass
class DGSState:
    tau: float = 0.5          # acceptance threshold on the preview score
    target: float = 0.25      # target acceptance rate (about 4x oversampling)
    gain: float = 0.12        # released constant in tau' = tau ** (1 + gain * (target - rho))
    max_step: float = 0.005   # tau moves at most this much per batch
    attempts: int = 0         # cumulative previews sampled
    accepted: int = 0         # cumulative previews that scored above tau (surplus ones included)

    def state_dict(self):
        return asdict(self)


def update_tau(state, rho):
    """Move tau toward the target acceptance rate given this batch's rate rho; returns new tau.

    With tau in (0, 1): rho < target -> exponent > 1 -> tau falls -> more previews pass.
    Call once per optimizer batch, so tau moves by at most max_step per batch.
    """
    tau = state.tau
    # DGS threshold update (released code): tau' = tau ^ (1 + gain * (target - rho))
    proposed = tau ** (1.0 + state.gain * (state.target - rho))
    step = min(max(proposed - tau, -state.max_step), state.max_step)
    # stay strictly inside (0, 1): at 0 or 1 the power law can no longer move tau
    state.tau = min(max(tau + step, 1e-3), 1.0 - 1e-3)
    return state.tau


def update_tau_released(state, rho):
    """The released threshold rule: propose tau ^ (1 + gain * (target - rho)) as update_tau does, but
    move tau by exactly max_step toward it when it is more than max_step away, else not at all
    (a dead band: at tau 0.5 it stays put for rho in about [0.13, 0.36])."""
    proposed = state.tau ** (1.0 + state.gain * (state.target - rho))
    if abs(proposed - state.tau) > state.max_step:
        step = state.max_step if proposed > state.tau else -state.max_step
        state.tau = min(max(state.tau + step, 1e-3), 1.0 - 1e-3)  # the same bounds as update_tau
    return state.tau


def dgs_group(start, score, finish, G, cap, state, batch=None):
    """Sample previews until G beat tau or `cap` previews were made; finish the G chosen ones.

    start(n) -> list of n partial rollouts (stopped at the preview step);
    score(partials) -> 1-D scores; finish(partials) -> list of finished rollouts.
    If fewer than G beat tau, the best-scoring rejected previews fill the group (highest first),
    so it always ends after at most `cap` previews and always returns exactly G rollouts.
    Returns (finished, stats); stats = attempts, above (previews above tau, surplus included),
    accepted (above tau and kept, <= G), filled (G - accepted), rho = above / attempts, scores (the
    preview scores of the G finished rollouts, in order).
    tau is not changed here: the caller runs update_tau once per batch with the batch's rho
    (sum of `above` over sum of `attempts`).
    """
    if G < 1:
        raise ValueError(f"group size G must be >= 1, got {G}")
    if cap < G:
        raise ValueError(f"DGS rollout cap ({cap}) must be >= group size G ({G}), "
                         "or the group could never be filled")
    per_round = batch or G
    accepted, rejected = [], []  # accepted holds (score, partial); rejected (score, order, partial)
    attempts = above = 0
    while len(accepted) < G and attempts < cap:
        n = min(per_round, cap - attempts)
        partials = list(start(n))
        scores = torch.as_tensor(score(partials), dtype=torch.float64).flatten().tolist()
        if len(partials) != n or len(scores) != n:
            raise ValueError(f"start/score returned {len(partials)}/{len(scores)} items, asked for {n}")
        for p, s in zip(partials, scores):
            if s > state.tau:
                above += 1
                if len(accepted) < G:  # surplus from the last round is dropped, but still counted
                    accepted.append((s, p))
            else:
                rejected.append((s, attempts, p))
            attempts += 1
    n_acc = len(accepted)
    # fill with the best rejected previews; ties keep sampling order
    rejected.sort(key=lambda t: (-t[0], t[1]))
    chosen = accepted + [(s, p) for s, _, p in rejected[:G - n_acc]]
    finished = list(finish([p for _, p in chosen]))
    if len(finished) != G:
        raise ValueError(f"finish returned {len(finished)} rollouts for {G} partials")
    state.attempts += attempts
    state.accepted += above
    # rho counts every preview above tau, surplus included: that is the acceptance rate 1 - F(tau)
    # the controller steers (dropping the surplus would bias rho low by the stopping rule)
    stats = dict(attempts=attempts, above=above, accepted=n_acc, filled=G - n_acc,
                 rho=above / attempts, scores=[s for s, _ in chosen])
    return finished, stats


def diagnostics(batch, rolls, G):
    """Learnability of each reward component on one batch (train.Rollouts), the total reward's share of
    zero-variance groups, and the preview / final-reward correlation when previews were scored."""
    out = {}
    for name, v in batch.comps.items():
        applies = torch.tensor([rewards.applies(name, r) for r in rolls]).view(-1, G)
        out[name] = learnability(v.view(-1, G), applies)
    R = batch.reward()
    out["total"] = learnability(R, torch.ones_like(R, dtype=torch.bool), success=float("inf"))
    if batch.preview is not None:
        out["total"]["preview_corr"] = within_group_corr(batch.preview.float(), R)
    return out


def diagnostics_table(d):
    """Markdown table of diagnostics(): one row per reward component."""
    lines = ["| reward | groups | mean | pass@1 | pass@G | zero-variance groups |", "|---|---|---|---|---|---|"]
    for name, v in d.items():
        passes = "| — | — |" if name == "total" else f"| {v['pass1']:.3f} | {v['passG']:.3f} |"  # the total has no "full credit"
        lines.append(f"| {name} | {v['groups']} | {v['mean']:.3f} {passes} {v['zero_var']:.2f} |")
    if "preview_corr" in d.get("total", {}):
        lines.append(f"\nDGS preview / final reward, within-prompt correlation: {d['total']['preview_corr']:.3f}")
    return "\n".join(lines)
