"""nbmoe.tp.dist: tensor parallelism over ``torch.distributed`` (gloo on CPU), one part per
process - the path past one NUMA node or one machine (docs/design.md §7).

Each rank (process) of a group holds part ``rank`` of every expert (``nbmoe.tp.partition``
of I: gate/up rows, down columns, in any stored format) and of the vocabulary
(``nbmoe.tp.vocab.VocabPartition``: embedding and LM head rows); everything else is
replicated. Dataflow of a training step, per rank::

    ids -> VocabParallelEmbedding: local lookup of the ids in this part, 0 elsewhere
           -> all-reduce (fp32)                                          -> hidden [T, D]
    attention, norms, router: replicated (every rank computes the same)
    experts: copy-in (x, routing weights, shared LoRA factors) -> this part's nbmoe
           experts, y in fp32 unrounded -> all-reduce (fp32) -> rounded once to bf16
    LM head: copy-in -> local logits [T, part_size] (never gathered for the loss)
    loss:  vocab-parallel cross-entropy: max, sum of exp and the target logit
           all-reduced (fp32), pad columns masked
    backward: "copy-in" all-reduces its gradient (fp32): grad_x, the routing weights'
           gradient and the shared LoRA gradients (A_gate, A_up, B_down) are summed over
           ranks; sliced LoRA gradients (B_gate, B_up, A_down rows/columns) stay local.

Every reduction is an fp32 all-reduce rounded once (gloo sums bf16 elementwise in bf16).
Shared LoRA parameters get the same summed gradient on every rank, so one optimizer step
per rank keeps them identical with no broadcast. Build the model and its adapters first
(``add_lora`` / ``load_lora``), then ``shard_model``, then the optimizer (the sharded
parameters are new tensors).
"""

import torch
import torch.distributed as dist
from torch import nn

from .. import torch as nt
from ..layer import expert_parts, part_weights
from ..quant import QuantizedWeight
from ..reference import LORA_FIELDS
from . import SLICED, lora_part
from .vocab import VocabPartition, check_weights


def _all_reduce(t, group, op=dist.ReduceOp.SUM):
    """The reduction of ``t`` over ``group`` in float32, returned in ``t``'s dtype (rounded once)."""
    out = t.detach().to(torch.float32, copy=True)
    dist.all_reduce(out, op=op, group=group)
    return out.to(t.dtype)


class _CopyIn(torch.autograd.Function):
    """Enter a tensor-parallel region: forward as is, backward the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceOut(torch.autograd.Function):
    """Leave it: forward the sum over ranks, backward as is (every rank holds the same gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_in(x, group=None):
    return _CopyIn.apply(x, group or dist.group.WORLD)


def reduce_out(x, group=None):
    return _ReduceOut.apply(x, group or dist.group.WORLD)


class _Part:
    """What a sharded module knows of its part: the group, this rank, the ranges of the
    dimension of ``size`` it splits (a model: its ``vocab`` VocabPartition too)."""

    def __init__(self, group, rank, world, parts, size, vocab=None):
        self.group, self.rank, self.world, self.parts, self.size = group, rank, world, parts, size
        self.vocab = vocab

    @property
    def range(self):
        return self.parts[self.rank]


class ExpertsPart(_Part):
    """A sharded experts module's part of I (``module._nbmoe_tp``): runs its experts and
    reduces over ranks (``experts``), and slices full LoRA factors to its part."""

    def experts(self, module, lora, hidden_states, top_k_index, top_k_weights):
        x = copy_in(hidden_states.float(), self.group)
        w = copy_in(top_k_weights.float(), self.group)
        if lora is not None:
            lora = [f if name in SLICED else copy_in(f, self.group) for name, f in zip(LORA_FIELDS, lora[0])], lora[1]
        y = nt._experts_local(module, lora, x, top_k_index, w, partial=True)
        return reduce_out(y, self.group).to(hidden_states.dtype)

    def slice_lora(self, field, full):
        """This part of a full-size LoRA factor (a copy), or the factor itself if shared."""
        return _owned_tensor(lora_part(field, full, *self.range)) if field in SLICED else full

    def slice_gate_up(self, gate_up):
        """This part of a full fused gate_up [E, 2I, H] (gate rows, then up rows), a new tensor."""
        (i0, i1), I = self.range, self.size
        return torch.cat([gate_up[:, i0:i1], gate_up[:, I + i0:I + i1]], dim=1)

    def slice_down(self, down):
        """This part of a full down [E, H, I] (its columns), a new tensor."""
        return _owned_tensor(down[:, :, slice(*self.range)])


def _owned_tensor(view):
    return view.clone(memory_format=torch.contiguous_format)


def _owned(w):
    """A QuantizedWeight holding copies of its arrays (a slice's views would keep the whole weight)."""
    zeros = None if w.zeros is None else w.zeros.copy()
    return QuantizedWeight(w.format, w.shape, w.group_size, w.codes.copy(), w.scales.copy(), zeros)


def _experts_part(name, module, group, rank, world):
    """The ``ExpertsPart`` of one experts module for this rank, or a ValueError naming the
    module: a world its I (int4: its groups) cannot be split into, or quantized experts a
    forward already packed (their QuantizedWeight are gone)."""
    E, I, H = nt._experts_shape(module)
    stored = nt.stored_experts(module)
    if stored is not None and stored.parts is None:
        raise ValueError(f"{name}: its quantized experts were packed by a forward already; shard the model "
                         f"before running it")
    fmt, group_size = ("bf16", None) if stored is None else (stored.format, stored.group_size)
    try:
        parts = expert_parts(I, world, fmt, group_size)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return ExpertsPart(group, rank, world, parts, I)


def _shard_experts(name, module, part):
    stored = nt.stored_experts(module)
    if stored is not None:
        nt._store(module, nt.StoredExperts(name, *(_owned(w) for w in part_weights(stored.parts, *part.range))))
    else:
        module.gate_up_proj = nn.Parameter(part.slice_gate_up(module.gate_up_proj.detach()), requires_grad=False)
        module.down_proj = nn.Parameter(part.slice_down(module.down_proj.detach()), requires_grad=False)
    if nt.has_lora(module):
        for field, pname in zip(LORA_FIELDS, nt.LORA_NAMES):
            if field in SLICED:
                setattr(module, pname, nn.Parameter(part.slice_lora(field, getattr(module, pname).detach())))
    module.__dict__.pop("_nbmoe_state", None)
    module.__dict__["_nbmoe_tp"] = part


class _VocabRows(nn.Module):
    """A module holding this rank's rows of a vocabulary-sized weight: ``weight``
    [part_size, D], the padded rows ``part.range(rank)`` of ``part`` (a VocabPartition)."""

    def __init__(self, weight, part, group=None):
        super().__init__()
        self.group = group or dist.group.WORLD
        self.part, self.rank = part, dist.get_rank(self.group)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)


class VocabParallelEmbedding(_VocabRows):
    """An embedding whose rows are split over ranks; forward(ids) -> [..., D], the full lookup."""

    def forward(self, ids):
        start, stop = self.part.range(self.rank)
        mine = (ids >= start) & (ids < stop)
        local = nn.functional.embedding(torch.where(mine, ids - start, 0), self.weight)
        return reduce_out(local.masked_fill(~mine.unsqueeze(-1), 0), self.group)


class _LMHead(torch.autograd.Function):
    """Local logits h @ W^T in h's dtype, as the unsharded head computes them; backward
    gives h this rank's partial gradient in float32, summed over ranks by ``copy_in``
    before it is rounded, once."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return nn.functional.linear(h.to(weight.dtype), weight).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad32 = grad.float()
        grad_h = grad32 @ weight.float() if ctx.needs_input_grad[0] else None
        grad_w = (grad32.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1]).float()).to(weight.dtype) \
            if ctx.needs_input_grad[1] else None
        return grad_h, grad_w


class ParallelLMHead(_VocabRows):
    """An LM head whose rows are split over ranks: forward(h [..., D]) -> this rank's logits
    [..., part_size] (pad columns included; ``gather_logits`` makes them [..., V])."""

    def forward(self, h):
        logits = _LMHead.apply(copy_in(h.float(), self.group), self.weight)
        return logits.to(h.dtype)


def gather_logits(local, part, group=None):
    """Every rank's logits [..., part_size] gathered into [..., V] (the pad dropped)."""
    group = group or dist.group.WORLD
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)[..., :part.vocab_size]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, part, group, ignore_index):
        rank = dist.get_rank(group)
        x = logits.detach().to(torch.float32, copy=True)
        x[:, part.valid(rank):] = -torch.inf                          # the pad is no word
        top = _all_reduce(x.max(dim=1).values, group, dist.ReduceOp.MAX)
        x -= top[:, None]
        exp = x.exp()
        sum_exp = _all_reduce(exp.sum(dim=1), group)
        start, stop = part.range(rank)
        ignored = labels == ignore_index
        mine = (labels >= start) & (labels < stop) & ~ignored
        index = torch.where(mine, labels - start, 0)
        target = _all_reduce(torch.where(mine, x.gather(1, index[:, None])[:, 0], 0.0), group)
        loss = torch.where(ignored, 0.0, sum_exp.log() - target)
        exp /= sum_exp[:, None]                                        # softmax, for backward
        ctx.save_for_backward(exp, mine, index, ignored)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, index, ignored = ctx.saved_tensors
        g = softmax.scatter_add(1, index[:, None], -mine.to(softmax.dtype)[:, None])
        g *= torch.where(ignored, 0.0, grad)[:, None]
        return g.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits, labels, part, group=None, ignore_index=-100):
    """Per-token softmax cross-entropy [N] (float32; 0 where labels == ``ignore_index``) of
    logits split over ranks: ``local_logits`` [N, part_size] this rank's columns, labels [N]
    full-vocabulary ids. Megatron's algorithm with the pad masked (``nbmoe.tp.vocab``)."""
    group = group or dist.group.WORLD
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= part.vocab_size))
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"labels[{i}] = {int(labels[i])}: expected a token id in [0, {part.vocab_size}) "
                         f"or ignore_index {ignore_index}")
    return _VocabParallelCrossEntropy.apply(local_logits, labels, part, group, ignore_index)


def _causal_lm_loss(part, group):
    """transformers' ForCausalLMLoss (shift, ignore_index, mean or sum / num_items_in_batch)
    on vocab-parallel logits."""
    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **kwargs):
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.reshape(-1)
        loss = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels, part, group,
                                            ignore_index).sum()
        if num_items_in_batch is not None:
            return loss / num_items_in_batch
        return loss / (shift_labels != ignore_index).sum()
    return loss_function


def _vocab_shard(weight, part, rank):
    """Rows [start, stop) of the padded vocabulary (pad rows zero), a new tensor."""
    start, _ = part.range(rank)
    out = weight.new_zeros((part.part_size, weight.shape[1]))
    n = part.valid(rank)
    out[:n] = weight.detach()[start:start + n]
    return out


def shard_model(model, group=None, multiple_of=64):
    """Make a transformers MoE model running on nbmoe experts tensor-parallel over ``group``
    (default: the world), in place: experts split on I, embedding and LM head on the
    vocabulary (tied ones stay tied), ``model(ids, labels=ids).loss`` vocab-parallel.
    ``model.logits`` become this rank's vocabulary columns (``gather_logits``).

    Every size is checked before anything changes or any collective runs: a world size
    that an experts module's I (int4: its groups) cannot be split into is a ValueError
    naming the module. Returns the model."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    if wrapped:
        raise ValueError(f"shard_model: {wrapped[0]} carries a PEFT adapter, which tensor parallelism does not "
                         f"split; train nbmoe's adapters (nbmoe.torch.add_lora, or load_lora of a PEFT folder)")
    experts = [(name, module, _experts_part(name, module, group, rank, world))
               for name, module in nt.experts_modules(model)]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    V, D = model.config.vocab_size, model.config.hidden_size
    check_weights(embed.weight, None if head is None else head.weight, V, D)
    part = VocabPartition(V, world, multiple_of)
    tied = head is not None and head.weight is embed.weight
    for name, module, mine in experts:
        _shard_experts(name, module, mine)
    local = nn.Parameter(_vocab_shard(embed.weight, part, rank), requires_grad=embed.weight.requires_grad)
    model.set_input_embeddings(VocabParallelEmbedding(local, part, group))
    if head is not None:
        weight = local if tied else nn.Parameter(_vocab_shard(head.weight, part, rank),
                                                 requires_grad=head.weight.requires_grad)
        model.set_output_embeddings(ParallelLMHead(weight, part, group))
    model.loss_function = _causal_lm_loss(part, group)
    model._nbmoe_tp = _Part(group, rank, world, [part.range(r) for r in range(world)], V, vocab=part)
    nt._use_nbmoe(model)
    return model


def gather_lora(model):
    """On rank 0: {name: tensor} of the full adapter, keyed and shaped as the unsharded
    model's LoRA parameters (``nbmoe.torch.lora_state_dict``); None on the other ranks.
    A collective: every rank calls it."""
    info = model._nbmoe_tp
    full = {}
    for name, module in nt.experts_modules(model):
        if not nt.has_lora(module):
            continue
        for field, pname in zip(LORA_FIELDS, nt.LORA_NAMES):
            t = getattr(module, pname).detach()
            if field in SLICED:
                pieces = [None] * info.world
                dist.all_gather_object(pieces, t, group=info.group)
                t = torch.cat(pieces, dim=SLICED[field])
            full[f"{name}.{pname}"] = t
    return full if info.rank == 0 else None


def shard_state_dict(model, state_dict):
    """This rank's slice of a full (unsharded) state dict for a sharded ``model``: experts'
    gate_up_proj / down_proj and sliced LoRA factors cut to the rank's part of I, embedding
    and LM head to its vocabulary rows; other tensors as they are. A tensor already of a
    shard's size where the full one belongs is a ValueError (``check_weights`` names it)."""
    info = model._nbmoe_tp
    part = info.vocab
    out = dict(state_dict)
    for name, module in nt.experts_modules(model):
        mine = module._nbmoe_tp
        I = mine.size
        for key, axis, full, cut in ((f"{name}.gate_up_proj", 1, 2 * I, mine.slice_gate_up),
                                     (f"{name}.down_proj", 2, I, mine.slice_down)):
            if key in out:
                if out[key].shape[axis] != full:
                    raise ValueError(f"{key}: expected the full {full} along axis {axis} (I = {I}), got "
                                     f"{tuple(out[key].shape)}: a shard?")
                out[key] = cut(out[key])
        for field, pname in zip(LORA_FIELDS, nt.LORA_NAMES):
            if f"{name}.{pname}" in out:
                out[f"{name}.{pname}"] = mine.slice_lora(field, out[f"{name}.{pname}"])
    params = dict(model.named_parameters(remove_duplicate=False))
    embed, head = model.get_input_embeddings().weight, getattr(model.get_output_embeddings(), "weight", None)
    keys = [k for k, p in params.items() if p is embed or p is head]
    embed_key = next((k for k in keys if params[k] is embed), None)
    head_key = next((k for k in keys if params[k] is head and k != embed_key), None)
    check_weights(out.get(embed_key), out.get(head_key), part.vocab_size, model.config.hidden_size)
    for key in keys:
        if key in out:
            out[key] = _vocab_shard(out[key], part, info.rank)
    return out
