"""``python -m nbmoe finetune``: LoRA fine-tuning of a tiny Qwen3-MoE on nbmoe, no download.

The model is built from a config (random base weights, bf16); LoRA adapters go on every
experts module (``nbmoe.torch.add_lora``) and AdamW trains only them. With ``peft=True``
the adapters are PEFT's own (``LoraConfig(target_parameters=[...gate_up_proj,
...down_proj])``, ``get_peft_model``), run on nbmoe experts, and timed against PEFT on
transformers' eager experts. The task is
synthetic: each sequence counts upward by a stride that its first token names
(``x[i+1] = x[i] + stride mod V``), so the loss can fall far below ``log V``. The job
prints the loss curve, then times the same training step with the experts on nbmoe and
on the eager baseline (``"nbmoe_reference"``: ``nbmoe.torch.eager_experts``, transformers'
loop over the experts with PEFT-style LoRA, the one ``python -m nbmoe bench`` measures).
"""

import time

import numba
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from . import torch as nt

TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
            num_experts=32, num_experts_per_tok=4, max_position_embeddings=256)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen3MoeConfig(**TINY), dtype=torch.bfloat16)


def batch(size, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    stride = torch.randint(1, 8, (size, 1), generator=g)
    ids = (start + stride * torch.arange(length)) % vocab
    ids[:, 0] = stride[:, 0]                        # the first token names the stride
    return ids


def train(model, params, steps, size, length, lr, seed, report):
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = batch(size, length, TINY["vocab_size"], seed + step)
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        report(step + 1, losses[-1])
    return losses


def tokens_per_second(model, params, implementation, steps, size, length, seed):
    model.set_experts_implementation(implementation)
    optimizer = torch.optim.AdamW(params, lr=0.0)     # the same work, weights unchanged
    ids = batch(size, length, TINY["vocab_size"], seed)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    return steps * size * length / (time.perf_counter() - start)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_model(model, rank, alpha):
    """``model`` with PEFT LoRA on its experts' parameters, experts on nbmoe; its LoRA parameters."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=EXPERTS))
    model.set_experts_implementation("nbmoe")
    return model, [p for p in model.parameters() if p.requires_grad]


def run(steps=60, size=8, length=64, rank=16, alpha=32.0, lr=1e-2, seed=0, timing_steps=3, report=None,
        peft=False, tp=False):
    """Fine-tune; returns (losses, {implementation: training tokens/s}, experts bytes stored
    here): "nbmoe" and the eager baseline ("nbmoe_reference" for nbmoe's adapters, "eager"
    for PEFT's). ``tp``: this process is one rank of the default process group
    (``torch.distributed`` initialised, e.g. by torchrun): the model is sharded over it
    (``nbmoe.tp.dist.shard_model``) and only nbmoe is timed. Every rank builds the same
    model and adapters from ``seed`` and trains on the same batches."""
    torch.set_num_threads(numba.get_num_threads())
    model = tiny_model(seed)
    model, params = peft_model(model, rank, alpha) if peft else (model, nt.add_lora(model, rank, alpha))
    if tp:
        from .tp.dist import shard_model

        shard_model(model)
        params = nt.lora_parameters(model)          # the sliced ones are new tensors
    losses = train(model, params, steps, size, length, lr, seed, report or (lambda step, loss: None))
    names = ("nbmoe",) if tp else ("nbmoe", "eager" if peft else "nbmoe_reference")
    speed = {name: tokens_per_second(model, params, name, timing_steps, size, length, seed) for name in names}
    return losses, speed, nt.experts_nbytes(model)
