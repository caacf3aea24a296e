"""What naming a model by its weights costs at start-up (kvstrata.fingerprint).

1. SmolLM2-135M (the real checkpoint, 538 MB fp32, 272 tensors): the sampled
   fingerprint with the page cache warm (median of 5, memo cleared), and cold
   (a private copy evicted with ``posix_fadvise(DONTNEED)`` first); a full
   SHA-256 of the file for comparison.
2. A Llama-3.1-8B-shaped checkpoint (bf16, 16.06 GB in 4 shards, the real
   tensor names, shapes and offsets; the data are sparse holes, so no disk
   space is used): the sampled fingerprint's CPU and syscall cost at 16 GB.
   Its cold cost is extrapolated from (1)'s measured time per sampled block;
   a full hash's from (1)'s measured SHA-256 throughput.

    python benchmarks/fingerprint.py     # ~1 min; writes benchmarks/results/fingerprint.json
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, utc_now, write_json  # noqa: E402

from kvstrata import fingerprint as fp  # noqa: E402
from kvstrata.offline.convert import prepare_smollm2  # noqa: E402


def sampled_blocks(path: Path) -> int:
    """How many SAMPLE_BYTES blocks the fingerprint reads from ``path``."""
    with open(path, "rb") as f:
        ranges = fp._safetensors_ranges(f.fileno(), os.fstat(f.fileno()).st_size)
    return sum(len(fp._offsets(s, e, k)) for s, e, k in ranges or [])


def timed_fingerprint(path: Path) -> float:
    fp._memo.clear()
    start = time.perf_counter()
    fp.checkpoint_fingerprint(path)
    return time.perf_counter() - start


def evict(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def llama8b_tensors() -> list[tuple[str, list[int]]]:
    hidden, inter, vocab, kv = 4096, 14336, 128256, 1024
    out = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(32):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [hidden, hidden]),
            (p + "self_attn.k_proj.weight", [kv, hidden]),
            (p + "self_attn.v_proj.weight", [kv, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
            (p + "input_layernorm.weight", [hidden]),
            (p + "post_attention_layernorm.weight", [hidden]),
        ]
    return out + [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]


def write_sparse_shards(directory: Path, shards: int = 4) -> int:
    """Llama-3.1-8B's safetensors layout (bf16) as sparse files; returns the total bytes."""
    tensors = llama8b_tensors()
    per = -(-len(tensors) // shards)
    total = 0
    for s in range(shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors[s * per : (s + 1) * per]:
            n = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = directory / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: reads return zeros, no disk used
        total += path.stat().st_size
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return total


def main() -> None:
    model = prepare_smollm2(progress=False)
    weights = model / "model.safetensors"
    rows: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "smollm2"
        shutil.copytree(model, copy)
        warm = [timed_fingerprint(copy) for _ in range(5)]
        cold = []
        for _ in range(3):
            evict(copy)
            cold.append(timed_fingerprint(copy))
        data = weights.read_bytes()
        start = time.perf_counter()
        hashlib.sha256(data).digest()  # hashing only: a cold full hash also reads every byte
        full = time.perf_counter() - start
        del data
        size, blocks = weights.stat().st_size, sampled_blocks(copy / "model.safetensors")
        rows["smollm2"] = {
            "bytes": size,
            "sampled_blocks": blocks,
            "sampled_bytes": blocks * fp.SAMPLE_BYTES,
            "warm_s": statistics.median(warm),
            "cold_s": statistics.median(cold),
            "full_sha256_warm_s": full,
            "full_sha256_gb_per_s": size / full / 1e9,
        }
        big = Path(tmp) / "llama8b"
        big.mkdir()
        total = write_sparse_shards(big)
        shard_blocks = sum(sampled_blocks(p) for p in big.glob("*.safetensors"))
        warm_big = [timed_fingerprint(big) for _ in range(3)]
        per_block_cold = statistics.median(cold) / blocks
        rows["llama8b_shape"] = {
            "bytes": total,
            "tensors": len(llama8b_tensors()),
            "sampled_blocks": shard_blocks,
            "sampled_bytes": shard_blocks * fp.SAMPLE_BYTES,
            "sampled_fraction": shard_blocks * fp.SAMPLE_BYTES / total,
            "measured_sparse_s": statistics.median(warm_big),
            "extrapolated_cold_s": per_block_cold * shard_blocks,
            "extrapolated_full_sha256_s": total / (size / full),
        }
    payload = {
        "benchmark": "fingerprint",
        "date": utc_now(),
        "command": command_line(),
        "machine": machine_info(),
        "results": rows,
    }
    out = write_json(Path(__file__).resolve().parent / "results" / "fingerprint.json", payload)
    print(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
