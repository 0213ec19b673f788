"""The linear heal (training-free; ours, after ReplaceMe): a least-squares map folded into the kept weights.

Number the residual writers of a decoder in depth order: the attention of layer l is writer 2l (it takes
the stream X_l to Y_l), its MLP writer 2l + 1 (Y_l to X_{l+1}); stream S_w enters writer w, so
S_{2l} = X_l, S_{2l+1} = Y_l and S_{2L} = X_L. A plan removes writers (a whole layer removes two), and
consecutive removed writers a..b form a *span*: the dense model carries the stream from S_a to S_{b+1}
through them; the pruned one hands S_a on unchanged.

For each span, the kept writer just before it (w = a - 1) adds its residual term m to S_w, giving S_a.
We fit a d x d map T so that S_w + T m is as close as possible to the dense model's S_{b+1}:

    T = argmin sum_t || (S_{b+1} - S_w)_t - T m_t ||^2 + lam ||T - I||^2 = (B + lam I) (A + lam I)^-1,
    A = sum_t m_t m_t^T,  B = sum_t (S_{b+1} - S_w)_t m_t^T,   lam = ridge * trace(A) / d,

accumulated in float64 over the training windows' tokens (massive-activation tokens left out: one such
token's norm would outweigh all others). Because m is the output of a linear layer (``o_proj`` or
``down_proj``, :attr:`~entrodrop.arch.ArchSpec.attn_out` / ``mlp_out``), T folds into its weights:
W <- T W, b <- T b. The healed model has the pruned model's architecture and reloads in vanilla
transformers. The map is applied to the writer's *term*, not to the whole stream, because the term is
what a kept weight produces; the stream itself also carries every earlier writer and the embeddings.

The ridge term pulls T towards the identity, i.e. towards the pruned model as it is, not towards zero
(which would silence the kept writer): a weak fit changes little. Spans are fitted in depth order on
the student with every earlier span already healed, so each fit sees the inputs it will get, and a
span's map is kept only if it lowers the KL(dense || student) on the validation slice; otherwise that
writer is restored and the notes say so. A span that starts at writer 0 has no writer before it and is
left as it is (said in the notes too).

Cost: every span is fitted in ONE forward of the student over all training windows at once: a hook on
each span's writer fits T on the batch, folds it, and hands the folded output on, so the deeper spans
see healed inputs in the same pass. The maps are then checked on the validation slice in depth order;
only when one is undone are the spans after it fitted again, in a new pass without it. No forward goes
past the last layer a fit reads, nor through the LM head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from ..arch import get_arch, get_layers, get_module
from ..capture import capture_residuals, forward_until, replace_outputs
from ..devices import input_device
from ..plan import DropPlan
from ..progress import ProgressEvent
from ..prune import preview_plan
from .core import HealProgress, HealResult, HealSettings, ValidationSlice, student_copy

logger = logging.getLogger(__name__)


def removed_writers(plan: DropPlan) -> set[int]:
    """The residual writers a plan removes (attention of layer l: 2l, its MLP: 2l + 1)."""
    removed = set()
    for b in plan.blocks:
        if b.kind in ("layer", "attn"):
            removed.add(2 * b.layer)
        if b.kind in ("layer", "mlp"):
            removed.add(2 * b.layer + 1)
    return removed


def spans_of(plan: DropPlan) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive removed writers, in depth order."""
    spans: list[tuple[int, int]] = []
    for w in sorted(removed_writers(plan)):
        if spans and spans[-1][1] == w - 1:
            spans[-1] = (spans[-1][0], w)
        else:
            spans.append((w, w))
    return spans


def _writer_linear(model: nn.Module, writer: int) -> nn.Module:
    spec = get_arch(model)
    layer, kind = divmod(writer, 2)
    name = spec.mlp_out if kind else spec.attn_out
    return get_module(get_layers(model, spec)[layer], name)


def _stream(cap, index: int) -> torch.Tensor:
    """S_index from a capture: X_l for even, Y_l for odd indexes."""
    layer, odd = divmod(index, 2)
    return cap.y[layer] if odd else cap.x[layer]


def check_linear(model: nn.Module, plan: DropPlan) -> None:
    """ValueError unless every foldable span's writer is a linear layer whose output is its residual term."""
    spec = get_arch(model)
    if spec.attn_out is None or spec.mlp_out is None:
        raise ValueError(
            f"The linear heal folds its map into the output projection of the block before each removed span, but "
            f"in {spec.family} a norm stands between that projection and the residual add (Gemma's post-attention "
            "and post-feedforward norms), so no kept weight can carry the map. Heal with method='lora'.")
    spans = spans_of(plan)
    if all(first == 0 for first, _ in spans):
        raise ValueError("The plan's only removed span starts at the first attention block, so there is no kept "
                         "block before it to fold a map into. Heal with method='lora'.")
    for first, _ in spans:
        if first == 0:
            continue
        try:
            module = _writer_linear(model, first - 1)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"The linear heal needs a linear output projection in every kept block; "
                             f"{spec.family} has none where the adapter says ({spec.attn_out}, {spec.mlp_out}). "
                             "Heal with method='lora'.")


def _fold(module: nn.Module, T: torch.Tensor) -> None:
    """Make ``module``'s output ``T`` times what it was: W <- T W (Linear) or W <- W T^T (GPT-2's Conv1D)."""
    weight = module.weight
    T = T.to(device=weight.device, dtype=torch.float64)
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            weight.copy_((T @ weight.double()).to(weight.dtype))
        else:  # transformers' Conv1D keeps (in, out): y = x W + b
            weight.copy_((weight.double() @ T.T).to(weight.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((T @ bias.double()).to(bias.dtype))


def _restore(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the parameters ``module`` had (a map undone)."""
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            p.copy_(saved[name])


def _keep(before: torch.Tensor, after: torch.Tensor, ratio: float) -> torch.Tensor:
    """(T,) mask of tokens whose norm is within ``ratio`` x the median in both streams (sinks left out)."""
    keep = torch.ones(before.shape[0], dtype=torch.bool, device=before.device)
    for stream in (before, after):
        norms = stream.norm(dim=-1)
        keep &= norms <= ratio * norms.median()
    return keep


def fit_map(m: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """The least-squares T (d x d, float64) with ``target_t ~ T m_t`` over rows of ``m`` and ``target`` (N, d),
    its ridge term pulling T towards the identity: ``(B + lam I)(A + lam I)^-1``."""
    m, target = m.double(), target.double()
    gram = m.T @ m  # (d, d) A
    cross = target.T @ m  # (d, d) B
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = ridge * float(torch.trace(gram)) / gram.shape[0]
    return torch.linalg.solve(gram + lam * eye, (cross + lam * eye).T).T  # (B + lam I)(A + lam I)^-1, A symmetric


TEACHER_CHUNK = 8  # windows per forward of the dense model when it records the targets


def _targets(model: nn.Module, train: torch.Tensor, spans: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """The dense model's stream after each span, S_{b+1}, on every training window: span -> (N, T, d) float32,
    CPU. Only the streams it needs are kept, and the forward stops at the deepest of them."""
    last_layer = len(get_layers(model)) - 1
    layers = {(b + 1) // 2 for _, b in spans}  # S_i lies in layer i // 2 (S_2L = X_L: "layer" L)
    parts: dict[tuple[int, int], list[torch.Tensor]] = {span: [] for span in spans}
    device = input_device(model)
    for start in range(0, train.shape[0], TEACHER_CHUNK):
        with torch.inference_mode(), capture_residuals(model, layers=layers) as cap:
            forward_until(model, min(max(layers), last_layer), input_ids=train[start:start + TEACHER_CHUNK].to(device),
                          use_cache=False)
            for span in spans:
                parts[span].append(_stream(cap, span[1] + 1))
    return {span: torch.cat(p) for span, p in parts.items()}


def _fit_pass(student: nn.Module, plan: DropPlan, train: torch.Tensor, targets: dict, spans: list[tuple[int, int]],
              settings: HealSettings) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """One forward of the student under the plan over every training window: each span's map is fitted where
    its writer runs and folded at once (the deeper spans see its output). Returns span -> (T, tokens fitted)."""
    maps: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}

    def fitter(span: tuple[int, int]):
        a = span[0]

        def fit_and_fold(module, inputs, output):
            s_before = _stream(cap, a - 1)  # (B, T, d): the stream the writer adds its term m to
            target = targets[span]
            keep = torch.stack([_keep(s_before[i], target[i], settings.massive_ratio) for i in range(target.shape[0])])
            # (B, T, d) like the stream: some models (OPT) run their MLP on the tokens flattened to (B*T, d)
            m = output.detach().to(device=s_before.device, dtype=torch.float32).reshape(s_before.shape)
            T = fit_map(m[keep], (target - s_before)[keep], settings.ridge)
            maps[span] = (T, int(keep.sum()))
            _fold(module, T)
            return module.forward(*inputs)  # what the folded writer gives, as every later forward will

        return fit_and_fold

    hooks = {_writer_linear(student, a - 1): fitter((a, b)) for a, b in spans}
    writer_layers = {(a - 1) // 2 for a, _ in spans}
    with torch.inference_mode(), preview_plan(student, plan), capture_residuals(student, layers=writer_layers) as cap, \
            replace_outputs(hooks):
        forward_until(student, max(writer_layers), input_ids=train.to(input_device(student)), use_cache=False)
    return maps


def iter_linear(model: nn.Module, plan: DropPlan, train: torch.Tensor, val: torch.Tensor,
                settings: HealSettings) -> Iterator[ProgressEvent]:
    """Fit and fold one map per span (see the module docstring); the last event carries the :class:`HealResult`."""
    started = time.monotonic()
    spans = spans_of(plan)
    foldable = [(a, b) for a, b in spans if a > 0]
    notes = [f"writers {a}-{b} start at the first attention block: nothing before them to fold into, left as "
             "they are" for a, b in spans if a == 0]
    total = len(foldable) + 2
    student = student_copy(model)
    validation = ValidationSlice(model, val)  # the dense log-probs on it, once
    before = validation.kl(student, plan)
    current = before

    def progress(done: int) -> ProgressEvent:
        return ProgressEvent("heal", done, total, HealProgress("linear", done, total, None, before, before, 0,
                                                               time.monotonic() - started, None))

    targets = _targets(model, train, foldable) if foldable else {}
    yield progress(1)
    decided, pending = 0, foldable
    while pending:
        writers = {span: _writer_linear(student, span[0] - 1) for span in pending}
        saved = {span: {name: p.detach().clone() for name, p in w.named_parameters(recurse=False)}
                 for span, w in writers.items()}
        maps = _fit_pass(student, plan, train, targets, pending, settings)
        for span, writer in writers.items():  # back to unfolded; each map goes in again only once checked
            _restore(writer, saved[span])
        refit = []
        for k, (a, b) in enumerate(pending):
            T, tokens = maps[(a, b)]
            _fold(writers[(a, b)], T)
            now = validation.kl(student, plan)
            kept = now < current
            logger.info("linear heal: writers %d-%d into writer %d (||T - I||_F = %.3f, %d tokens): validation KL "
                        "%.4f -> %.4f, %s", a, b, a - 1, float((T - torch.eye(T.shape[0], dtype=T.dtype)).norm()),
                        tokens, current, now, "kept" if kept else "undone")
            decided += 1
            if kept:
                current = now
                yield progress(decided + 1)
                continue
            _restore(writers[(a, b)], saved[(a, b)])
            notes.append(f"the map for writers {a}-{b} raised the validation KL ({current:.4f} -> {now:.4f} nats), "
                         "so it was undone")
            yield progress(decided + 1)
            refit = pending[k + 1:]  # fitted on a stream with this map in: fitted again without it
            break
        pending = refit
    after = current
    history = [{"step": 0, "train_loss": None, "val_kl": before, "seconds": 0.0},
               {"step": 1, "train_loss": None, "val_kl": after, "seconds": time.monotonic() - started}]
    result = HealResult("linear", plan, student, settings.to_dict(), history, before, after,
                        best_step=1 if after < before else 0, steps_done=len(foldable), seconds=0.0, stopped=False,
                        train_windows=int(train.shape[0]), val_windows=int(val.shape[0]),
                        seq_len=int(train.shape[1]), notes=notes)
    yield ProgressEvent("heal", total, total, result)
