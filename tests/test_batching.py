"""Packed, prefix-shared and chunked layouts give what plain per-sequence forwards give (fp32, 1e-4)."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_workflow.models.forward import body_hidden_states, pad_batch
from rlhf_workflow.models.layout import LayoutOptions, layout
from rlhf_workflow.models.logprobs import sequence_logprobs, token_logprobs

from conftest import build_model, build_tokenizer

TOL = 1e-4
LAYOUTS = {
    "padded": LayoutOptions(),
    "shared": LayoutOptions(share_prefix=True),
    "packed": LayoutOptions(pack_length=40),
    "shared+packed": LayoutOptions(share_prefix=True, pack_length=64),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("chatml")


def model_for(tok, attn: str):
    # a larger init than the default 0.02 so that a token attending where it should not shows clearly
    model = build_model(tok, seed=3, initializer_range=0.3, attn_implementation=attn)
    return model.eval()


def random_groups(seed: int, n: int = 5, responses: int = 2) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(10, 300) for _ in range(k)]  # noqa: E731
    return [(tokens(rng.randint(1, 12)), [tokens(rng.randint(1, 15)) for _ in range(responses)]) for _ in range(n)]


def reference(model, tok, groups, *, left: bool):
    """Per sequence: the last hidden state and the summed response log-probs, from plain padded forwards."""
    sequences = [(p, r) for p, responses in groups for r in responses]
    ids, mask = pad_batch([p + r for p, r in sequences], tok.pad_token_id, left=left)
    ids, mask = ids.to(model.device), mask.to(model.device)  # bench/gpu_check.py runs this on a GPU
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
        hidden = body_hidden_states(model, ids, mask)
    lasts, logps = [], []
    for row, (p, r) in enumerate(sequences):
        start = ids.size(1) - len(p) - len(r) if left else 0
        end = start + len(p) + len(r)
        lasts.append(hidden[row, end - 1])
        logp = torch.log_softmax(logits[row, start + len(p) - 1 : end - 1].float(), -1)
        logps.append(logp.gather(1, torch.tensor(r, device=logp.device)[:, None]).sum())
    return torch.stack(lasts), torch.stack(logps)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_plain_forwards(tok, attn, name):
    model = model_for(tok, attn)
    for seed in range(3):
        groups = random_groups(seed, responses=1 + seed % 3)  # one, two and three responses per prompt
        batch = layout(groups, tok.pad_token_id, LAYOUTS[name])
        with torch.no_grad():
            hidden = body_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            logp, counts = sequence_logprobs(hidden, model.lm_head, batch, chunk=7)
        last = hidden[batch["last_row"], batch["last_col"]]
        assert counts.tolist() == [len(r) for _, responses in groups for r in responses]
        for left in (False, True):
            want_last, want_logp = reference(model, tok, groups, left=left)
            assert (last - want_last).abs().max() < TOL, (name, attn, seed, left)
            assert (logp - want_logp).abs().max() < TOL, (name, attn, seed, left)
        expected_tokens = sum(len(p) + len(r) for p, responses in groups for r in responses)
        assert int(batch["num_tokens"]) == expected_tokens


def test_shared_prefix_computes_each_prompt_once_and_packing_leaves_little_padding(tok):
    groups = random_groups(0, n=8)
    plain = layout(groups, tok.pad_token_id, LAYOUTS["padded"])
    shared = layout(groups, tok.pad_token_id, LAYOUTS["shared"])
    packed = layout(groups, tok.pad_token_id, LayoutOptions(share_prefix=True, pack_length=128))
    shared_real = sum(len(p) + sum(map(len, rs)) for p, rs in groups)
    assert int(shared["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1).sum()) == shared["input_ids"].numel()
    assert plain["input_ids"].size(0) == 16 and shared["input_ids"].size(0) == 8
    assert packed["input_ids"].numel() < shared["input_ids"].numel()
    assert packed["input_ids"].numel() - shared_real < 128  # only the last row's tail is padding... or less
    assert int(plain["num_tokens"]) == int(shared["num_tokens"]) == int(packed["num_tokens"])


def test_position_ids_alone_do_not_isolate_packed_sequences(tok):
    """Why packed rows carry a 4-D mask: with a 2-D all-ones mask and restarted position ids,
    the second sequence of a row attends to the first one under sdpa and eager attention."""
    groups = random_groups(1, n=2, responses=1)
    batch = layout(groups, tok.pad_token_id, LayoutOptions(pack_length=100))
    assert batch["input_ids"].size(0) == 1  # both in one row
    for attn in ("sdpa", "eager"):
        model = model_for(tok, attn)
        with torch.no_grad():
            isolated = body_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            leaky = body_hidden_states(model, batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["position_ids"])
        rows, cols = batch["last_row"], batch["last_col"]
        first_unit_end = int(min(cols))  # the unit placed first ends first; its states agree either way
        assert (isolated[0, : first_unit_end + 1] - leaky[0, : first_unit_end + 1]).abs().max() < TOL
        assert (isolated[rows, cols] - leaky[rows, cols]).abs().max() > 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_their_gradients_match_the_full_projection(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.randn(13)
    full = token_logprobs(hidden, head, targets, chunk=0)
    (full * weights).sum().backward()
    want = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()
    chunked = token_logprobs(hidden, head, targets, chunk=4)
    (chunked * weights).sum().backward()
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert (full - chunked).abs().max() < 1e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_a_16_bit_projection_corrects_its_log_probs_in_fp32(how):
    """Under bf16 autocast, or with bf16 weights, the projection's products run in bf16, and the
    target's and each row's top logits are recomputed in fp32: far closer to fp32 log-probs than
    bf16 logits are, with gradients as close as bf16 products allow."""
    torch.manual_seed(0)
    vocab, width, rows = 3000, 64, 40
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight.data.mul_(8)  # logits of a few tens, as a real head's, where bf16 steps are 1/8 apart
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    weights = torch.randn(rows)

    exact = torch.log_softmax(hidden.double() @ head.weight.double().t(), -1).gather(1, targets[:, None]).squeeze(1)
    (exact * weights).sum().backward()
    want = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    plain = torch.log_softmax((hidden.bfloat16() @ head.weight.bfloat16().t()).float(), -1).gather(1, targets[:, None])

    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = token_logprobs(hidden, head, targets, chunk=16)
        (got * weights).sum().backward()
        grads = [hidden.grad, head.weight.grad]
    else:
        low = torch.nn.Linear(width, vocab, bias=False).to(torch.bfloat16)
        low.weight.data.copy_(head.weight.data)
        low_hidden = hidden.detach().bfloat16().requires_grad_()
        got = token_logprobs(low_hidden, low, targets, chunk=16)
        (got * weights).sum().backward()
        grads = [low_hidden.grad.float(), low.weight.grad.float()]
        # the exact answer for the bf16-rounded operands
        exact = torch.log_softmax(low_hidden.double() @ low.weight.double().t(), -1).gather(1, targets[:, None]).squeeze(1)
    assert got.dtype == torch.float32
    error, plain_error = (got.double() - exact).abs().mean(), (plain.squeeze(1).double() - exact).abs().mean()
    assert error < plain_error / 5, (error, plain_error)
    for g, w in zip(grads, want):
        assert ((g.double() - w.double()).norm() / w.double().norm()) < 3e-2


def test_the_projection_backward_runs_in_its_forward_precision():
    """The backward's products are in the dtype the forward chose, whether or not autocast is still
    on when backward runs (the autograd engine may run it elsewhere)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 400, bias=False)
    targets = torch.randint(0, 400, (24,))
    grads = []
    for backward_inside in (True, False):
        hidden = torch.randn(24, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = token_logprobs(hidden, head, targets, chunk=8)
            if backward_inside:
                out.sum().backward()
        if not backward_inside:
            out.sum().backward()
        grads.append(hidden.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_16_bit_projection_of_a_vocabulary_smaller_than_its_exact_top():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5, bias=True)
    hidden, targets = torch.randn(6, 8), torch.randint(0, 5, (6,))
    want = torch.log_softmax(hidden @ head.weight.t() + head.bias, -1).gather(1, targets[:, None]).squeeze(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(hidden, head, targets, chunk=4)
    assert (got - want).abs().max() < 1e-5  # every logit recomputed in fp32


def test_an_fp32_projection_stays_fp32():
    """Without autocast and with fp32 weights, the chunked log-probs are those of fp32 logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=True)
    hidden = torch.randn(20, 32)
    targets = torch.randint(0, 500, (20,))
    want = torch.log_softmax(hidden @ head.weight.t() + head.bias, -1).gather(1, targets[:, None]).squeeze(1)
    assert (token_logprobs(hidden, head, targets, chunk=8) - want).abs().max() < 1e-5


def test_layout_refuses_empty_pieces(tok):
    with pytest.raises(ValueError, match="at least one token"):
        layout([([1, 2], [[3], []])], tok.pad_token_id)
