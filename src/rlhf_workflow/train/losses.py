"""Loss functions: pure functions of tensors, each with its equation.

Every loss returns a SUM over its units (tokens for SFT, pairs for preference losses) and the
training loop divides by the number of units in the whole global batch (all processes, all
accumulation steps). That makes the gradient independent of how a global batch is split into
micro-batches and processes, so one process and N processes give the same training curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y_t | y_<t) for each position: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Returns a [batch, seq - 1] tensor aligned with ``labels[:, 1:]``.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the response tokens, summed.

        L_SFT = − Σ_t m_t · log π(x_t | x_<t)

    where m_t = 1 on assistant/response tokens and 0 on prompt and padding tokens. Divide by
    Σ_t m_t over the global batch for the per-token mean.
    """
    logp = token_logprobs(logits, input_ids)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * mask).sum()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry reward-model loss, summed over pairs.

        L_BT = − Σ_i log σ(r_c,i − r_r,i − m_i)  +  η · Σ_i (r_c,i + r_r,i)²

    r_c, r_r: rewards of the chosen and rejected response of pair i; m_i: an optional margin the
    chosen reward must clear (Llama 2, Touvron et al., 2023); η: an optional reward-centering
    coefficient (Eisenstein et al., 2023) that keeps rewards near zero, since BT only fixes
    differences. With m = 0 and η = 0 this is the loss of Ouyang et al. (2022) used in the RLHF
    Workflow paper.
    """
    diff = chosen_rewards.float() - rejected_rewards.float() - margin
    loss = -F.logsigmoid(diff).sum()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards.float() + rejected_rewards.float()).pow(2).sum()
    return loss


def label_token_loss(label_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer token of a pairwise preference model, summed over examples.

        L_PM = − Σ_i log softmax(z_i)[y_i]

    z_i: the next-token logits (whole vocabulary) at the position after the prompt "[CONTEXT] …
    [RESPONSE A] … [RESPONSE B] …"; y_i: the token of the better response's label ("A" or "B").
    (Dong, Xiong et al., 2024, §2.2: the preference model is trained as an instruction-following
    task whose answer is the single label token.)
    """
    return F.cross_entropy(label_logits.float(), labels, reduction="sum")


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Pairs whose chosen response scores higher, a tie counting half, summed over pairs:

        A = Σ_i 1[s_c,i > s_r,i] + ½ · 1[s_c,i = s_r,i]

    s: a reward model's rewards, or DPO's implicit rewards β log π/π_ref. (Not a loss: a metric of the
    reward and DPO objectives, summed like their losses and divided by the pairs of the global batch.)
    """
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum()


# --------------------------------------------------------------------------- DPO family
#
# Each takes h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)), the
# policy's log-ratio margin of a pair (summed or per-token-averaged log-probs), and returns the
# loss of every pair (not yet summed), so the DPO objective only picks the function by name.


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al., 2023), and conservative DPO for ε > 0 (Mitchell, 2023):

        ℓ = −(1 − ε) · log σ(β h) − ε · log σ(−β h)

    ε is the probability that a label is flipped; ε = 0 is plain DPO, the RLHF Workflow paper's loss.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024): unbiased under labels flipped with probability ε < ½:

        ℓ = [ −(1 − ε) · log σ(β h) + ε · log σ(−β h) ] / (1 − 2ε)
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing
    )


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al., 2023): regress the log-ratio margin onto 1 / (2β) instead of pushing it to ∞:

        ℓ = (h − 1 / (2β))²

    (β here is the paper's τ; ε is unused.)
    """
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge loss of SLiC-HF (Zhao et al., 2023) on the log-ratio margin, as in RSO (Liu et al., 2024):

        ℓ = max(0, 1 − β h)

    (ε is unused.)
    """
    return torch.relu(1 - beta * h)


PREFERENCE_LOSSES = {"sigmoid": sigmoid_loss, "robust": robust_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
) -> torch.Tensor:
    """The DPO-family loss of a batch of pairs, summed over pairs:

        h_i = (log π(y_c,i|x_i) − log π_ref(y_c,i|x_i)) − (log π(y_r,i|x_i) − log π_ref(y_r,i|x_i))
        L   = Σ_i ℓ_type(h_i; β, ε)  +  α · Σ_i nll_i

    with ℓ_type one of `PREFERENCE_LOSSES`. nll_i is the chosen response's per-token negative
    log-likelihood, −log π(y_c,i|x_i) / |y_c,i|; α > 0 adds it as in RPO (Pang et al., 2024).
    The log-probs are sums over response tokens, or per-token averages when the trainer
    length-normalises them.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = PREFERENCE_LOSSES[loss_type](h.float(), beta, label_smoothing).sum()
    if rpo_alpha:
        if nll is None:
            raise ValueError("rpo_alpha > 0 needs the chosen responses' nll")
        loss = loss + rpo_alpha * nll.float().sum()
    return loss
