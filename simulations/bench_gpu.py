"""GPU benchmark of a split model, and the memory each half needs at real sizes.

Measured (needs a CUDA GPU; without one it prints one line and exits with code 2):
  * bottom throughput (real tokens/s): ``split.bottom`` on the GPU, ids in and float32 hidden
    states out on the CPU, as a device releases them;
  * the perturbation's share of the device's time: the defence (on the CPU float32 release)
    over bottom + defence;
  * top throughput (tokens/s) for one training step: forward, backward into LoRA and the head,
    AdamW step;
  * peak GPU memory of each phase (``torch.cuda.max_memory_allocated``).

    python simulations/bench_gpu.py --model /models/Mistral-7B-v0.1 --split-layer 3 --dtype bfloat16
    python simulations/bench_gpu.py --memory-table            # no GPU needed: from published configs
    python simulations/bench_gpu.py --memory-table --config /models/Meta-Llama-3-8B/config.json

The memory table counts weights only (no activations, which grow with batch x length): the device
holds the bottom (embeddings + ``split_layer`` blocks) in its dtype; the cloud holds the top's
frozen blocks in its dtype plus the trained LoRA adapters and head in float32 with their gradients
and AdamW's two moments (16 bytes per trained weight).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Published sizes (the models' config.json on the Hugging Face hub).
PUBLISHED = {
    "roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         intermediate_size=3072, num_attention_heads=12, max_position_embeddings=514,
                         type_vocab_size=1),
    "Mistral-7B-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                            intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            tie_word_embeddings=False),
    "Meta-Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                            intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            tie_word_embeddings=False),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENCODERS = ("bert", "roberta", "xlm-roberta")


def parameter_counts(cfg: dict, *, num_labels: int = 2, lora_rank: int = 8) -> dict[str, int]:
    """Weights per part of a BERT/RoBERTa encoder or a Llama/Mistral/Qwen2 decoder, from its config.

    Returns counts (not bytes): ``embeddings``, ``block`` (one), ``final_norm``, ``classifier``,
    ``lm_head`` (0 when tied to the embeddings), ``lora_block`` (one block's query/value adapters)."""
    v, d, i = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    if cfg["model_type"] in ENCODERS:
        embeddings = v * d + cfg.get("max_position_embeddings", 512) * d + cfg.get("type_vocab_size", 2) * d + 2 * d
        block = 4 * (d * d + d) + 2 * d + (d * i + i) + (i * d + d) + 2 * d
        pooled = d * d + d  # BERT's pooler, or RoBERTa's classifier.dense
        return dict(embeddings=embeddings, block=block, final_norm=0, classifier=pooled + d * num_labels + num_labels,
                    lm_head=0, lora_block=lora_rank * (d + d) * 2)
    kv = cfg.get("num_key_value_heads", heads) * (cfg.get("head_dim") or d // heads)
    bias = d + 2 * kv if cfg["model_type"] == "qwen2" else 0  # Qwen2's q/k/v projections carry biases
    block = d * d + 2 * d * kv + d * d + bias + 3 * d * i + 2 * d
    tied = cfg.get("tie_word_embeddings", False)
    return dict(embeddings=v * d, block=block, final_norm=d, classifier=d * num_labels, lm_head=0 if tied else v * d,
                lora_block=lora_rank * (d + d) + lora_rank * (d + kv))


def memory_row(name: str, cfg: dict, *, split_layer: int, dtype: str, lora_rank: int = 8) -> dict:
    """GiB on the device (bottom) and in the cloud (top + LoRA + head, trained in float32 with AdamW)."""
    n = parameter_counts(cfg, lora_rank=lora_rank)
    layers, width = cfg["num_hidden_layers"], BYTES[dtype]
    bottom = n["embeddings"] + split_layer * n["block"]
    top_frozen = (layers - split_layer) * n["block"] + n["final_norm"]
    trained = (layers - split_layer) * n["lora_block"] + n["classifier"]
    total = n["embeddings"] + layers * n["block"] + n["final_norm"] + n["lm_head"]
    gib = 2 ** 30
    return {
        "model": name, "dtype": dtype, "split_layer": split_layer, "params_total_B": total / 1e9,
        "device_bottom_GiB": bottom * width / gib,
        # u-shaped generation: the device also holds the final norm and the lm_head (tied: nothing more)
        "device_u_shaped_lm_head_GiB": (n["final_norm"] + n["lm_head"]) * width / gib,
        "cloud_top_GiB": (top_frozen * width + trained * 16) / gib,
        "cloud_trained_params_M": trained / 1e6,
    }


def memory_table(configs: dict[str, dict], split_layer: int, dtypes=("float32", "bfloat16")) -> list[dict]:
    rows = [memory_row(name, cfg, split_layer=split_layer, dtype=dt) for name, cfg in configs.items() for dt in dtypes]
    head = (f"{'model':<18} {'dtype':<9} {'params':>8} {'device: bottom':>15} {'+ lm_head (u-gen)':>18} "
            f"{'cloud: top+LoRA':>16}")
    print(head)
    for r in rows:
        print(f"{r['model']:<18} {r['dtype']:<9} {r['params_total_B']:>7.3f}B {r['device_bottom_GiB']:>11.2f} GiB "
              f"{r['device_u_shaped_lm_head_GiB']:>14.2f} GiB {r['cloud_top_GiB']:>12.2f} GiB")
    return rows


def _timed(fn, sync):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def benchmark(args) -> dict:
    import torch

    from privtune_flwr.defenses import build_defense
    from privtune_flwr.models import load_split

    device = "cuda"
    split = load_split(args.model, args.split_layer, "classification", 2, lora_rank=args.lora_rank,
                       bottom_device=device, bottom_dtype=args.dtype, top_device=device, top_dtype=args.dtype)
    sync = torch.cuda.synchronize
    g = torch.Generator().manual_seed(0)
    low = max(split.tokenizer.all_special_ids or [0]) + 1
    high = split.vocab_size if low < split.vocab_size - 1 else split.vocab_size
    ids = torch.randint(min(low, high - 1), high, (args.batch_size, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g)
    tokens = int(mask.sum())
    defense = build_defense(args.defense, epsilon=args.epsilon, split=split, seed=0)

    bottom_s = defense_s = 0.0
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        hidden, t_bottom = _timed(lambda: split.bottom(ids, mask), sync)  # CPU ids in, CPU float32 out
        released, t_defense = _timed(lambda: defense(hidden, ids, mask), sync)
        if step >= args.warmup:
            bottom_s, defense_s = bottom_s + t_bottom, defense_s + t_defense
    bottom_peak = torch.cuda.max_memory_allocated()

    params = [p for p in split.top.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    split.top.train()
    torch.cuda.reset_peak_memory_stats()
    top_s = 0.0

    def train_step():
        loss = torch.nn.functional.cross_entropy(split.top(released, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    for step in range(args.warmup + args.steps):
        _, t_top = _timed(train_step, sync)
        if step >= args.warmup:
            top_s += t_top
    top_peak = torch.cuda.max_memory_allocated()
    return {
        "model": args.model, "gpu": torch.cuda.get_device_name(0), "dtype": args.dtype, "split_layer": args.split_layer,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "defense": args.defense,
        "epsilon": args.epsilon, "bottom_tokens_per_s": tokens * args.steps / bottom_s,
        "defense_seconds_per_batch": defense_s / args.steps,
        "perturbation_share_of_bottom": defense_s / (bottom_s + defense_s),
        "top_train_tokens_per_s": tokens * args.steps / top_s,
        "bottom_peak_GiB": bottom_peak / 2 ** 30, "top_peak_GiB": top_peak / 2 ** 30,
        "trained_params_M": sum(p.numel() for p in params) / 1e6,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'minilm', 'smollm2', a local folder or a Hugging Face id")
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--defense", default="dchi", help="dchi needs no tables; privtune builds a V x V neighbour graph")
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--json", default="outputs/bench_gpu.json", help="where the results go")
    parser.add_argument("--memory-table", action="store_true", help="print the weight memory of each half (no GPU)")
    parser.add_argument("--config", action="append", default=[], help="a config.json to add to the memory table")
    args = parser.parse_args(argv)

    if args.memory_table:
        configs = dict(PUBLISHED)
        for path in args.config:
            configs[Path(path).parent.name or path] = json.loads(Path(path).read_text())
        rows = memory_table(configs, args.split_layer)
        result = {"memory_table": rows}
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine with "
                  "one, or use --memory-table", file=sys.stderr)
            return 2
        result = benchmark(args)
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
